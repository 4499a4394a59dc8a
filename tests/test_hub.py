"""--checkpoint ORG/NAME: Hugging Face repo ids resolved through a local Hugging Face cache (no network).

The tests build the hub's cache layout themselves (HF_HUB_CACHE/models--org--name/snapshots/<rev>/
with refs/main naming <rev>) holding the tiny fixture release, and set HF_HUB_OFFLINE=1.  The
download plan (only the files the model reads) is checked against a fake Hub listing.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from bagel_jax.inference import generate
from bagel_jax.weights import hub
from bagel_jax.weights.errors import CheckpointError
from tests.conftest import FIXTURE_DIR

TOKENIZER = FIXTURE_DIR.parent / "tokenizer" / "tokenizer.json"
REPO = "org/bagel-tiny"
REV = "0123456789abcdef0123456789abcdef01234567"
RELEASE_FILES = ("llm_config.json", "vit_config.json", "bagel_config.json", "ema.safetensors", "ae.safetensors")


def make_cache(root: pathlib.Path, repo: str = REPO, files=RELEASE_FILES) -> pathlib.Path:
  """The hub's cache layout for `repo` at REV (refs/main -> REV), with the fixture release and tokenizer."""
  store = root / ("models--" + repo.replace("/", "--"))
  snap = store / "snapshots" / REV
  snap.mkdir(parents=True)
  (store / "refs").mkdir()
  (store / "refs" / "main").write_text(REV)
  for f in files:
    shutil.copy2(FIXTURE_DIR / f, snap / f)
  shutil.copy2(TOKENIZER, snap / "tokenizer.json")
  return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  root = tmp_path / "hf_cache"
  snap = make_cache(root)
  monkeypatch.setenv("HF_HUB_CACHE", str(root))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return snap


def test_repo_id_resolves_to_the_cached_snapshot(offline_cache, tmp_path, capsys):
  assert hub.is_repo_id(REPO) and hub.is_repo_id(REPO + "@main")
  assert not hub.is_repo_id(str(FIXTURE_DIR)) and not hub.is_repo_id("./org/name")
  assert hub.resolve_checkpoint(REPO) == offline_cache
  assert hub.resolve_checkpoint(FIXTURE_DIR) == FIXTURE_DIR  # a local folder as today
  # The generate command by repo id: the same image as from the folder itself.
  outs = {}
  for name, ckpt in (("repo", [REPO]), ("folder", [str(FIXTURE_DIR), "--tokenizer", str(TOKENIZER)])):
    outs[name] = tmp_path / f"{name}.png"
    rc = generate.main(["--checkpoint", *ckpt, "--prompt", "a red cat", "--size", "16x24", "--steps", "3",
                        "--seed", "1", "--out", str(outs[name]), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
  a, b = (np.asarray(Image.open(outs[k])) for k in ("repo", "folder"))
  np.testing.assert_array_equal(a, b)


def test_trainer_model_config_by_repo_id(offline_cache):
  from bagel_jax.config import load_config
  from bagel_jax.train import base_config
  from bagel_jax.train.config import model_config
  c = base_config()
  c.model.checkpoint = REPO
  assert model_config(c) == load_config(FIXTURE_DIR)


def one_line_error(argv, capsys) -> str:
  rc = generate.main(argv + ["--prompt", "x", "--out", "never.png", "--no-progress"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert not pathlib.Path("never.png").exists()
  return err


def test_missing_repo_or_file_is_one_line(offline_cache, capsys):
  err = one_line_error(["--checkpoint", "org/no-such-model"], capsys)
  assert "org/no-such-model" in err and "HF_HUB_OFFLINE" in err and "cache" in err
  (offline_cache / "ae.safetensors").unlink()
  err = one_line_error(["--checkpoint", REPO], capsys)
  assert REPO in err and "lacks ae.safetensors" in err


class FakeHub:
  """A Hub listing and downloads served from a local folder (records every request)."""

  def __init__(self, remote: pathlib.Path, cache: pathlib.Path):
    self.remote, self.cache, self.calls = remote, cache, []

  def list_files(self, repo, revision):
    return sorted(str(p.relative_to(self.remote)) for p in self.remote.rglob("*") if p.is_file())

  def download(self, repo, revision, patterns, local_only):
    import fnmatch
    self.calls.append((tuple(patterns), local_only))
    snap = self.cache / repo.replace("/", "--")
    if local_only:
      if not snap.is_dir():
        from huggingface_hub.errors import LocalEntryNotFoundError
        raise LocalEntryNotFoundError("not cached")
      return snap
    for name in self.list_files(repo, revision):
      if any(fnmatch.fnmatch(name, p) for p in patterns):
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.remote / name, snap / name)
    return snap


def test_download_only_the_files_the_model_reads(tmp_path, monkeypatch):
  """A sharded release with extra files: two small-file passes, then exactly the needed files."""
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
  remote = tmp_path / "remote"
  remote.mkdir()
  for f in ("llm_config.json", "vit_config.json", "ae.safetensors"):
    shutil.copy2(FIXTURE_DIR / f, remote / f)
  shutil.copy2(TOKENIZER, remote / "tokenizer.json")
  (remote / "ema-00001-of-00002.safetensors").write_bytes(b"1")
  (remote / "ema-00002-of-00002.safetensors").write_bytes(b"2")
  (remote / "ema.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"a": "ema-00001-of-00002.safetensors", "b": "ema-00002-of-00002.safetensors"}}))
  for extra in ("README.md", "vocab.json", "model-int8.safetensors", "test_images/meme.jpg"):
    (remote / extra).parent.mkdir(parents=True, exist_ok=True)
    (remote / extra).write_bytes(b"not needed")
  fake = FakeHub(remote, tmp_path / "cache")
  monkeypatch.setattr(hub, "list_files", fake.list_files)
  monkeypatch.setattr(hub, "download", fake.download)

  folder = hub.resolve_checkpoint(REPO)
  got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
  assert got == sorted(["llm_config.json", "vit_config.json", "tokenizer.json", "ae.safetensors",
                        "ema.safetensors.index.json", "ema-00001-of-00002.safetensors",
                        "ema-00002-of-00002.safetensors"])
  assert [local for _, local in fake.calls] == [True, False, False]  # the cache first, then the Hub
  # A second resolve is served from the cache alone.
  fake.calls.clear()
  assert hub.resolve_checkpoint(REPO) == folder and [c[1] for c in fake.calls] == [True]

  # A repo without the VAE: refused after the small files, before any weights are fetched.
  (remote / "ae.safetensors").unlink()
  fake.cache = tmp_path / "cache2"
  fake.calls.clear()
  with pytest.raises(CheckpointError, match="the repo has no ae.safetensors"):
    hub.resolve_checkpoint(REPO)
  assert all(p == hub.SMALL_FILES for p, _ in fake.calls)


def test_converted_folder_plan(tmp_path):
  names = {"llm_config.json", "vit_config.json", "tokenizer.json", "conversion.json", "state/manifest.ocdbt"}
  wanted, missing = hub.plan_files(names, tmp_path)
  assert wanted == ["llm_config.json", "vit_config.json", "tokenizer.json", "conversion.json", "state/**"]
  assert missing == []
  assert hub.plan_files(names - {"tokenizer.json"}, tmp_path)[1] == ["tokenizer.json"]
  assert hub.plan_files(names - {"tokenizer.json"}, tmp_path, need_tokenizer=False)[1] == []


def test_repo_id_size_and_out_checked_before_the_weights_download(tmp_path, monkeypatch, capsys):
  """--checkpoint ORG/NAME: --out is checked before any download, --size once the configs are
  here and before any weights file is fetched, with the messages a local folder gets."""
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
  remote = tmp_path / "remote"
  make_cache(tmp_path / "unused")  # (the fixture release, copied below as the Hub's files)
  shutil.copytree(tmp_path / "unused" / ("models--" + REPO.replace("/", "--")) / "snapshots" / REV, remote)
  fake = FakeHub(remote, tmp_path / "cache")
  monkeypatch.setattr(hub, "list_files", fake.list_files)
  monkeypatch.setattr(hub, "download", fake.download)
  for size in ("30x32", "4096x4096"):
    errs = []
    for ckpt in (REPO, str(remote)):
      rc = generate.main(["--checkpoint", ckpt, "--prompt", "x", "--size", size, "--out", str(tmp_path / "a.png")])
      errs.append(capsys.readouterr().err.strip())
      assert rc == 2 and len(errs[-1].splitlines()) == 1 and errs[-1].startswith(f"error: --size {size} "), errs[-1]
    assert errs[0] == errs[1]
  assert fake.calls and all(p == hub.SMALL_FILES for p, _ in fake.calls)  # no weights were fetched
  assert not (tmp_path / "cache" / REPO.replace("/", "--") / "ema.safetensors").exists()
  fake.calls.clear()
  rc = generate.main(["--checkpoint", REPO, "--prompt", "x", "--out", str(tmp_path / "no" / "such.png")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err == f"error: --out {tmp_path / 'no' / 'such.png'}: the folder {tmp_path / 'no'} does not exist", err
  assert fake.calls == []  # refused before any download
