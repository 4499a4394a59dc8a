"""Fault injection for training: kill -9 at random points, damaged checkpoints, a full disk, read-only folders.

Runs `python -m bagel_jax.train --config configs/tiny.py` (12 steps, a checkpoint every 4) in
subprocesses sharing one TFDS folder and one persistent compilation cache, so only the first
run compiles (one CPU device, LLVM's cheap settings). The uninterrupted run is the reference:
every interrupted, damaged or resumed run must log the same losses at every step, exactly one
metrics row per step (metrics.jsonl and TensorBoard), and end with the same final state (the
fingerprints of every array).
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.fault_tools import assert_one_line, flip_bytes, full_disk, read_only, snapshot, tb_scalars, truncate
from tests.train_fixtures import FAST_XLA

# One worker runs the module, so its reference run (the module fixture) is trained once, not once per worker.
pytestmark = pytest.mark.xdist_group("faults_train")

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS, EVERY = 12, 4
PREFIX = "bagel_jax.train: error: "


def _env(cache: pathlib.Path) -> dict:
  env = dict(os.environ)
  env.update(XLA_FLAGS=FAST_XLA, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
             PYTHONUNBUFFERED="1")
  return env


class Trainer:
  """The tiny training command with this module's data and cache folders."""

  def __init__(self, root: pathlib.Path):
    self.root, self.data, self.cache = root, root / "tfds", root / "xla_cache"

  def cmd(self, workdir: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bagel_jax.train", "--config", str(REPO / "configs" / "tiny.py"),
            "--workdir", str(workdir), f"--config.data.groups.t2i.data_dir={self.data}",
            f"--config.data.groups.qa.data_dir={self.data}", f"--config.train.steps={STEPS}",
            f"--config.train.save_every={EVERY}", "--config.train.keep=3", *extra]

  def run(self, workdir: pathlib.Path, *extra: str, preexec=None, env: dict | None = None,
          timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(self.cmd(workdir, *extra), cwd=REPO, env=dict(_env(self.cache), **(env or {})),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)

  def start(self, workdir: pathlib.Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(self.cmd(workdir, *extra), cwd=REPO, env=_env(self.cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def rows(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_meta(workdir: pathlib.Path, step: int = STEPS) -> dict:
  return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def assert_same_run(ref: pathlib.Path, got: pathlib.Path) -> None:
  """Identical losses at every step, one metrics row per step, the same final arrays and data state."""
  a, b = rows(ref), rows(got)
  assert [m["step"] for m in b] == list(range(1, STEPS + 1)), [m["step"] for m in b]
  for x, y in zip(a, b):
    for k in ("loss", "ce", "mse", "grad_norm"):
      assert x[k] == y[k], (x["step"], k, x[k], y[k])
  tb = tb_scalars(got / "tb", "train/loss")
  assert sorted(tb) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in tb.values()), tb
  fa, fb = final_meta(ref), final_meta(got)
  assert fa["fingerprint"] == fb["fingerprint"] and fa["data_sha256"] == fb["data_sha256"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  return Trainer(tmp_path_factory.mktemp("faults_train"))


@pytest.fixture(scope="module")
def reference(trainer):
  work = trainer.root / "straight"
  r = trainer.run(work)
  assert r.returncode == 0, r.stderr[-3000:]
  return work


def _kill_when_stepping(p: subprocess.Popen, delay: float, deadline: float) -> None:
  """SIGKILL `delay` seconds after the run reports its first step (read from its stderr)."""
  lines: list[str] = []
  reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)
  reader.start()
  while not any("first step" in ln for ln in lines):
    assert p.poll() is None, "".join(lines)[-3000:]
    assert time.time() < deadline, "the run never started stepping"
    time.sleep(0.02)
  time.sleep(delay)
  os.kill(p.pid, signal.SIGKILL)
  p.wait()


def test_kill_9_at_random_points_then_resume(trainer, reference):
  """Killed with SIGKILL twice, at seeded random moments while it steps and saves, then run to the
  end: the same losses, metrics rows, final arrays and data state as the uninterrupted run."""
  rng = random.Random(1234)
  work = trainer.root / "killed"
  for _ in range(2):
    p = trainer.start(work)
    _kill_when_stepping(p, rng.uniform(0.0, 1.5), time.time() + 1200)
  r = trainer.run(work)
  assert r.returncode == 0, r.stderr[-3000:]
  assert not list((work / "checkpoints").glob("*.orbax-checkpoint-tmp*"))  # stale temporary saves removed
  assert_same_run(reference, work)


def test_corrupt_newest_checkpoint_falls_back(trainer, reference):
  """A byte-flipped array file in the newest checkpoint: one warning line, the run resumes from the
  step before and ends exactly as the uninterrupted run; the damaged step is set aside, not deleted."""
  work = trainer.root / "corrupt"
  shutil.copytree(reference, work)
  newest = work / "checkpoints" / str(STEPS)
  data = max((p for p in (newest / "state").rglob("*") if p.is_file() and "/d/" in p.as_posix()),
             key=lambda p: p.stat().st_size)
  flip_bytes(data)
  damaged = snapshot(newest)
  r = trainer.run(work)
  assert r.returncode == 0, r.stderr[-3000:]
  warn = [ln for ln in r.stderr.splitlines() if "is corrupt or incomplete" in ln]
  assert len(warn) == 1 and f"{newest}" in warn[0] and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert f"at step {STEPS - EVERY}" in r.stderr
  assert snapshot(work / "checkpoints" / f"{STEPS}.corrupt-0") == damaged
  assert_same_run(reference, work)


@pytest.mark.parametrize("damage", ["truncate", "flip_metadata"])
def test_no_intact_checkpoint_is_one_error_line(trainer, reference, damage):
  work = trainer.root / f"all_corrupt_{damage}"
  shutil.copytree(reference, work, ignore=shutil.ignore_patterns("tb"))
  steps = sorted(int(d.name) for d in (work / "checkpoints").iterdir() if d.name.isdigit())
  for s in steps:
    meta = work / "checkpoints" / str(s) / "state" / "_METADATA"
    truncate(meta, 10) if damage == "truncate" else flip_bytes(meta, 5)
  r = trainer.run(work)
  assert r.returncode == 2
  line = assert_one_line(r.stderr, PREFIX)
  assert f"{work / 'checkpoints'}: no intact checkpoint" in line, line


def test_full_disk_while_saving(trainer, reference):
  """The disk fills up mid-run (a 12 MB tmpfs holds the VAE and the step-4 checkpoint, not step 8's;
  without mounts a 600 kB file-size limit fails the first save): one line naming the file, exit 2;
  what was saved stays intact and the next run (with space) resumes from it to the same end."""
  with full_disk(trainer.root / "small_disk", 12 << 20, 600_000) as (disk, preexec, text):
    work = disk / "run"
    r = trainer.run(work, preexec=preexec)
    assert r.returncode == 2, r.stderr[-3000:]
    line = assert_one_line(r.stderr, PREFIX)
    assert text in line, line
    saved = sorted(int(d.name) for d in (work / "checkpoints").iterdir() if d.name.isdigit())
    moved = trainer.root / "after_full_disk"
    shutil.copytree(work, moved)
  r = trainer.run(moved)
  assert r.returncode == 0, r.stderr[-3000:]
  if saved:
    assert f"at step {saved[-1]}" in r.stderr
  assert_same_run(reference, moved)


def test_read_only_workdir(trainer, tmp_path):
  work = tmp_path / "ro"
  work.mkdir()
  (work / "notes.txt").write_text("mine\n")
  before = snapshot(work)
  with read_only(work) as env:
    r = trainer.run(work, env=env)
  assert r.returncode == 2, r.stderr[-3000:]
  line = assert_one_line(r.stderr, PREFIX)
  assert str(work) in line and ("Read-only file system" in line or "Permission denied" in line), line
  assert snapshot(work) == before
