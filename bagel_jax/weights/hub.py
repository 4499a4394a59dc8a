"""Checkpoints named by a Hugging Face repo id, resolved to a local folder.

    folder = resolve_checkpoint("ByteDance-Seed/BAGEL-7B-MoT")     # or "org/name@revision"
    folder = resolve_checkpoint("/data/BAGEL-7B-MoT")              # an existing path: itself

An existing local path always wins.  A repo id is looked up in the local Hugging Face cache first
(`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`): a complete cached snapshot
is used without any network access.  Otherwise, unless `HF_HUB_OFFLINE` is set, only the files
the model reads are downloaded, with the hub's progress bars: the configs, `tokenizer.json`,
`ae.safetensors` and `ema.safetensors` (or a `*.safetensors.index.json` and the shards it names),
or a converted folder's `state/`.  Every failure is one `CheckpointError` line naming the repo
and what is missing.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import pathlib
import re
from typing import AbstractSet as Set, Callable, Sequence

from bagel_jax.weights.errors import CheckpointError

SMALL_FILES = ("llm_config.json", "vit_config.json", "bagel_config.json", "tokenizer.json", "conversion.json",
               "*.safetensors.index.json")
INDEX_GLOB = "*.safetensors.index.json"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}(@[\w./-]+)?$")
_TRUE = ("1", "ON", "YES", "TRUE")


def is_repo_id(spec: str | os.PathLike) -> bool:
  """"org/name" or "org/name@revision" that is not an existing local path."""
  text = str(spec)
  return bool(_REPO_ID.match(text)) and not text.startswith(".") and not pathlib.Path(text).exists()


def offline() -> bool:
  """HF_HUB_OFFLINE as set now (the hub library reads it once, at import)."""
  from huggingface_hub import constants
  return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def cache_dir() -> str:
  """HF_HUB_CACHE as set now, else HF_HOME/hub, else the hub library's default."""
  from huggingface_hub import constants
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  if os.environ.get("HF_HOME"):
    return os.path.join(os.environ["HF_HOME"], "hub")
  return constants.HF_HUB_CACHE


def shard_names(indexes: Sequence[pathlib.Path]) -> list[str]:
  """The files named by safetensors index files ("weight_map": key -> file)."""
  names: set[str] = set()
  for p in indexes:
    try:
      names |= set(json.loads(pathlib.Path(p).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise CheckpointError(f"{p}: not a readable safetensors index ({type(e).__name__})") from None
  return sorted(names)


def plan_files(names: Set[str], folder: pathlib.Path, need_tokenizer: bool = True) -> tuple[list[str], list[str]]:
  """(the files the model reads, those of them not in `names`) for a release or converted folder.

  names: the folder's or repo's file paths ("state/..." for a converted folder's arrays); index
  files are read from `folder`.
  """
  need = ["llm_config.json", "vit_config.json"] + (["tokenizer.json"] if need_tokenizer else [])
  extra = [f for f in ("bagel_config.json", "conversion.json") if f in names]
  if any(n.startswith("state/") for n in names):  # converted: configs + the Orbax arrays
    return need + extra + ["state/**"], [f for f in need if f not in names]
  need.append("ae.safetensors")
  indexes = sorted(n for n in names if fnmatch.fnmatch(n, INDEX_GLOB))
  if "ema.safetensors" in names or not indexes:
    need.append("ema.safetensors")
  else:
    extra += indexes
    need += shard_names([folder / i for i in indexes])
  return need + extra, [f for f in need if f not in names]


def local_names(folder: pathlib.Path) -> set[str]:
  names = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
  return names | ({"state/"} if (folder / "state").is_dir() else set())


def list_files(repo: str, revision: str | None) -> list[str]:
  """The repo's file paths (one Hub call)."""
  from huggingface_hub import HfApi
  return HfApi().list_repo_files(repo, revision=revision)


def download(repo: str, revision: str | None, patterns: Sequence[str], local_only: bool) -> pathlib.Path:
  """The files of `repo` matching `patterns`, from the cache or the Hub: the snapshot folder."""
  from huggingface_hub import snapshot_download
  return pathlib.Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir(), allow_patterns=list(patterns),
                                        local_files_only=local_only or offline()))


def _local_errors() -> tuple[type, ...]:
  """The hub's "not in the cache and not allowed / able to download" errors."""
  from huggingface_hub import errors as he
  return tuple(getattr(he, n) for n in ("LocalEntryNotFoundError", "IncompleteSnapshotError", "OfflineModeIsEnabled")
               if hasattr(he, n))


def _hub_error(spec: str, e: Exception) -> CheckpointError:
  from huggingface_hub import errors as he
  if isinstance(e, he.RevisionNotFoundError):
    return CheckpointError(f"{spec}: revision not found on the Hugging Face Hub")
  if isinstance(e, he.GatedRepoError):
    return CheckpointError(f"{spec}: a gated repo: accept its terms on huggingface.co and log in (`hf auth login`)")
  if isinstance(e, he.RepositoryNotFoundError):
    return CheckpointError(f"{spec}: no such local folder, and no such model repo on the Hugging Face Hub "
                           "(or it is private: log in with `hf auth login`)")
  if isinstance(e, _local_errors()):
    why = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached"
    return CheckpointError(f"{spec}: no such local folder, and not in the Hugging Face cache {cache_dir()} ({why})")
  first = (str(e).strip().splitlines() or [""])[0]
  return CheckpointError(f"{spec}: no such local folder, and the Hugging Face Hub failed ({type(e).__name__}: "
                         f"{first[:200]})")


@contextlib.contextmanager
def _hub_errors(spec: str):
  from huggingface_hub import errors as he
  try:
    yield
  except (he.HfHubHTTPError, he.HFValidationError, OSError, *_local_errors()) as e:
    raise _hub_error(spec, e) from None
  except Exception as e:  # connection failures (httpx) and other transport errors
    if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "h11", "ssl"):
      raise _hub_error(spec, e) from None
    raise


def _cached(spec: str, repo: str, revision: str | None, need_tokenizer: bool) -> pathlib.Path | None:
  """The cached snapshot if it holds every file the model reads (no network)."""
  try:
    with _hub_errors(spec):
      folder = download(repo, revision, SMALL_FILES, local_only=True)
  except CheckpointError:
    if offline():
      raise
    return None
  _, missing = plan_files(local_names(folder), folder, need_tokenizer)
  if missing and offline():
    raise CheckpointError(f"{spec}: the cached snapshot {folder} lacks {', '.join(missing)}, and HF_HUB_OFFLINE "
                          "is set")
  return None if missing else folder


def resolve_checkpoint(spec: str | os.PathLike, *, need_tokenizer: bool = True,
                       check_configs: Callable[[pathlib.Path], None] | None = None) -> pathlib.Path:
  """A local path as is; a repo id as its snapshot folder (cached, else downloaded unless offline).

  check_configs: called with a folder holding the repo's config files once they are here and
  before any weights file is fetched (a request the model cannot serve costs no weights download).
  """
  if not is_repo_id(spec):
    return pathlib.Path(spec)
  check = check_configs or (lambda folder: None)
  spec = str(spec)
  repo, _, revision = spec.partition("@")
  revision = revision or None
  folder = _cached(spec, repo, revision, need_tokenizer)
  if folder is not None:
    check(folder)
    return folder
  with _hub_errors(spec):
    names = set(list_files(repo, revision))
    small = download(repo, revision, SMALL_FILES, local_only=False)
    wanted, missing = plan_files(names, small, need_tokenizer)
  if missing:
    raise CheckpointError(f"{spec}: the repo has no {', '.join(missing)} (not a BAGEL release or converted "
                          "folder)")
  check(small)
  with _hub_errors(spec):
    return download(repo, revision, wanted, local_only=False)


__all__ = ["resolve_checkpoint", "is_repo_id", "plan_files", "shard_names", "offline", "cache_dir", "list_files", "download"]
