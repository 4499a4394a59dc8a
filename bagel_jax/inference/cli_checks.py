"""What the inference command lines check before loading any weights, and how they report a failure.

    out = output_path(args.out)                # its folder exists and can be written
    folder = checkpoint_folder(args.checkpoint, lambda cfg: check_image_size(cfg, args.size, "--size"))
                                               # a folder holding weights and configs (a repo id:
                                               # resolved, the check run before its weights download)
    save_png(image, out)                       # written beside `out`, then renamed: never half an image
    return reported(body)                      # one line and status 2 for a bad request or a fault
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
from typing import Any, Callable

from bagel_jax.inference.errors import InferenceError

WEIGHT_FILES = ("ema.safetensors", "ema.safetensors.index.json", "model.safetensors.index.json")


def checkpoint_config(path: str | os.PathLike):
  """The BagelConfig of a release or converted folder (read from its small config files)."""
  from bagel_jax.config import load_config
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise InferenceError(f"--checkpoint {folder}: no such folder")
  cfg = load_config(folder)
  if not ((folder / "state").is_dir() or any((folder / f).is_file() for f in WEIGHT_FILES)):
    raise InferenceError(f"--checkpoint {folder}: no weights here (neither ema.safetensors of a release nor "
                         "state/ of a converted folder)")
  return cfg


def checkpoint_folder(path: str, check: Callable[[Any], None] = lambda cfg: None,
                      need_tokenizer: bool = True) -> pathlib.Path:
  """The local folder of --checkpoint, `check(cfg)` run on its BagelConfig before any weights are
  read. A Hugging Face repo id is resolved here (the cache, else the Hub): `check` runs once its
  config files are here and before its weights are downloaded."""
  from bagel_jax.config import load_config
  from bagel_jax.weights.hub import is_repo_id, resolve_checkpoint
  if is_repo_id(path):
    return resolve_checkpoint(path, need_tokenizer=need_tokenizer,
                              check_configs=lambda folder: check(load_config(folder)))
  check(checkpoint_config(path))
  return pathlib.Path(path)


def output_path(path: str) -> pathlib.Path:
  """An output file whose folder exists and can be written (checked by creating a scratch file)."""
  out = pathlib.Path(path)
  if out.is_dir():
    raise InferenceError(f"--out {out}: is a folder; give a file name, e.g. {out / 'image.png'}")
  if not out.parent.is_dir():
    raise InferenceError(f"--out {out}: the folder {out.parent} does not exist")
  try:
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.check-"):
      pass
  except OSError as e:
    raise InferenceError(f"--out {out}: cannot write in {out.parent} ({e.strerror})") from None
  return out


def save_png(image, out: pathlib.Path) -> None:
  """Writes a PNG beside `out` and renames it onto `out`: a full disk leaves no half-written image."""
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  try:
    image.save(tmp, format="PNG")
    os.replace(tmp, out)
  finally:
    tmp.unlink(missing_ok=True)


def user_errors() -> tuple[type[BaseException], ...]:
  from bagel_jax.config import ConfigError
  from bagel_jax.tokenizer import TokenizerError
  from bagel_jax.weights import CheckpointError
  return (InferenceError, ConfigError, CheckpointError, TokenizerError)


def reported(body: Callable[[], int]) -> int:
  """Runs a command's body; a bad request or a fault of the machine is one line on stderr and status 2."""
  from bagel_jax import faults
  faults.quiet_background_tracebacks()
  try:
    return body()
  except user_errors() as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # noqa: BLE001 - a full disk or an unreadable file is one line; a bug keeps its traceback
    line = faults.describe(e)
    if line is None or faults.show_traceback():
      raise
    print(f"error: {line}", file=sys.stderr)
    return 2
