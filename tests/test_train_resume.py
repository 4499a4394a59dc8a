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


def test_sigterm_saves_and_exits_cleanly(shared):
  """SIGTERM mid-run: the step in flight finishes, a checkpoint of it is saved, exit status 0; the
  same command then resumes from that step."""
  root, data, cache = shared
  work = root / "sigterm"
  p = subprocess.Popen(train_cmd(work, data, "--config.train.steps=100000", "--config.train.save_every=100000",
                                 "--config.train.log_every=1"),
                       cwd=REPO, env=train_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not ((work / "metrics.jsonl").is_file() and len((work / "metrics.jsonl").read_text().splitlines()) >= 3):
    assert p.poll() is None, p.stderr.read()[-3000:]
    assert time.time() < deadline, "the run never reached step 3"
    time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-3000:]
  assert "stopped by signal" in err
  saved = [int(d.name) for d in (work / "checkpoints").iterdir() if d.name.isdigit()]
  assert len(saved) == 1 and saved[0] >= 3
  step = saved[0]
  r = subprocess.run(train_cmd(work, data, f"--config.train.steps={step + 2}", "--config.train.log_every=1"),
                     cwd=REPO, env=train_env(cache), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"at step {step}" in r.stderr and "resumed" in r.stderr
  assert max(losses(work)) == step + 2


def test_nonfinite_streak_stops_the_run(shared):
  """Every loss non-finite (a NaN CE weight): updates are skipped and counted, and after
  train.max_nonfinite_streak in a row the run stops with a one-line message and exit status 2."""
  root, data, cache = shared
  work = root / "nan"
  r = subprocess.run(train_cmd(work, data, "--config.train.ce_weight=nan", "--config.train.max_nonfinite_streak=3",
                               "--config.train.log_every=1"),
                     cwd=REPO, env=train_env(cache), capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      "bagel_jax.train: error: 3 steps in a row had a non-finite loss or gradient (last at step 3); stopping. "
      "Lower the learning rate or check the data.")
  logged = losses(work)
  assert [logged[s]["nonfinite_updates"] for s in sorted(logged)] == [1, 2]
