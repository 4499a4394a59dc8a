"""Exact resume: 20 steps straight == 10 steps, kill -9, resume for 10 (identical losses at every step).

Runs `python -m bagel_jax.train --config configs/tiny.py` in subprocesses (one CPU device, a
shared persistent compilation cache so only the first run compiles). The killed run saves its
step-10 checkpoint (async), waits, and is killed with SIGKILL from here; the third run resumes
model, optimizer, EMA, step, RNG and the data iterator from that checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def train_env(cache_dir: pathlib.Path) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device in the child
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
             PYTHONUNBUFFERED="1")
  return env


def train_cmd(workdir: pathlib.Path, data_dir: pathlib.Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "bagel_jax.train", "--config", str(REPO / "configs" / "tiny.py"),
          "--workdir", str(workdir),
          f"--config.data.groups.t2i.data_dir={data_dir}", f"--config.data.groups.qa.data_dir={data_dir}", *extra]


def losses(workdir: pathlib.Path) -> dict[int, dict]:
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    out[m["step"]] = m  # a resumed run rewrites later steps: keep the last
  return out


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  return root, root / "tfds", root / "xla_cache"


def test_exact_resume_after_kill(shared):
  root, data_dir, cache = shared
  env = train_env(cache)
  straight, killed = root / "straight", root / "killed"

  r = subprocess.run(train_cmd(straight, data_dir), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]

  p = subprocess.Popen(train_cmd(killed, data_dir, "--config.debug.hang_after_step=10"), env=env, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (killed / "HANG_10").exists():
    assert p.poll() is None, p.stderr.read()[-3000:]
    assert time.time() < deadline, "the run never reached step 10"
    time.sleep(0.2)
  os.kill(p.pid, signal.SIGKILL)  # kill -9
  p.wait()
  assert p.returncode == -signal.SIGKILL
  assert sorted(int(d.name) for d in (killed / "checkpoints").iterdir() if d.name.isdigit()) == [10]

  r = subprocess.run(train_cmd(killed, data_dir), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed" in r.stderr

  a, b = losses(straight), losses(killed)
  assert sorted(a) == list(range(1, 21)) and sorted(b) == list(range(1, 21))
  for step in range(1, 21):
    for k in ("loss", "ce", "mse", "grad_norm"):
      assert a[step][k] == b[step][k], (step, k, a[step][k], b[step][k])
  # The data iterator resumed too: same sample counts per group.
  assert a[20]["samples/t2i"] == b[20]["samples/t2i"] and a[20]["samples/qa"] == b[20]["samples/qa"]
