"""Exact resume through every way a run can stop: 8 steps straight == the same 8 steps run as

    A: killed (kill -9) while the async save of step 4 is in flight (step 2 is the last committed);
    B: resumed from 2, killed (kill -9) after the save of step 4 has completed;
    C: resumed from 4, stopped by SIGTERM (the step in flight finishes, is saved, exit status 0);
    D: resumed from that step to 8;

and the final checkpoints are identical bit for bit (parameters, optimiser state, EMA, RNG, step
and skip counters, the data iterator's state, the frozen VAE), as are the logged metrics of
every step. Then a run whose every loss is non-finite stops after train.max_nonfinite_streak
steps with a one-line message and exit status 2.

`python -m bagel_jax.train --config configs/tiny.py` in subprocesses (one CPU device); a
persistent compilation cache shared by the runs, so only the first one compiles the step (the
non-finite run poisons its batches with `debug.nonfinite_batches`: same shapes, same executable).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.train_fixtures import FAST_XLA

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 8


def train_env(cache_dir: pathlib.Path) -> dict:
  env = dict(os.environ)
  env.update(XLA_FLAGS=FAST_XLA, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
             PYTHONUNBUFFERED="1")
  return env


def train_cmd(workdir: pathlib.Path, data_dir: pathlib.Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "bagel_jax.train", "--config", str(REPO / "configs" / "tiny.py"),
          "--workdir", str(workdir), f"--config.train.steps={STEPS}", "--config.train.save_every=2",
          "--config.train.keep=10",
          f"--config.data.groups.t2i.data_dir={data_dir}", f"--config.data.groups.qa.data_dir={data_dir}", *extra]


def metrics(workdir: pathlib.Path) -> dict[int, dict]:
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    out[m["step"]] = m  # a resumed run rewrites later steps: keep the last
  return out


def committed(workdir: pathlib.Path) -> list[int]:
  return sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())


class Run:
  """A training subprocess; `wait_for(predicate)` polls until it holds (the run must stay alive)."""

  def __init__(self, cmd, env):
    self.p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

  def wait_for(self, what: str, predicate, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not predicate():
      assert self.p.poll() is None, f"the run ended before {what}: {self.p.stderr.read()[-3000:]}"
      assert time.time() < deadline, f"timed out waiting for {what}"
      time.sleep(0.1)

  def kill9(self) -> None:
    self.p.kill()  # SIGKILL
    self.p.wait()
    assert self.p.returncode == -signal.SIGKILL

  def finish(self, timeout: float = 900) -> str:
    _, err = self.p.communicate(timeout=timeout)
    assert self.p.returncode == 0, err[-3000:]
    return err


def saved_state(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  """Every array of a step's checkpoint (train state, flat by path) and of the VAE folder."""
  out = {}
  with ocp.StandardCheckpointer() as c:
    for prefix, path in (("state/", workdir / "checkpoints" / str(step) / "state"), ("vae/", workdir / "vae")):
      out.update({prefix + k: np.asarray(v) for k, v in c.restore(path).items()})
  return out


def item_files(workdir: pathlib.Path, step: int, item: str) -> dict[str, bytes]:
  folder = workdir / "checkpoints" / str(step) / item
  return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*"))
          if f.is_file() and f.name != "commit_success.txt"}  # (that one names its own folder)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """The dataset folder and the compilation cache, shared by this module's runs."""
  root = tmp_path_factory.mktemp("resume")
  return root, root / "tfds", train_env(root / "xla_cache")


def test_exact_resume_after_kills_and_sigterm(shared):
  root, data, env = shared
  straight, chain = root / "straight", root / "chain"
  Run(train_cmd(straight, data), env).finish()
  assert committed(straight) == [2, 4, 6, 8]

  a = Run(train_cmd(chain, data, "--config.debug.hang_during_save_step=4"), env)
  a.wait_for("the save of step 4", (chain / "HANG_SAVE_4").exists)
  a.kill9()
  assert committed(chain) == [2], "the save of step 4 was not in flight"
  assert [d.name for d in (chain / "checkpoints").iterdir() if d.name.startswith("4.")], "no partial step-4 folder"

  b = Run(train_cmd(chain, data, "--config.debug.hang_after_step=4"), env)
  b.wait_for("step 4 saved", (chain / "HANG_4").exists)
  b.kill9()
  assert committed(chain) == [2, 4]

  logged = len((chain / "metrics.jsonl").read_text().splitlines())  # run A logged a step or two past 4
  c = Run(train_cmd(chain, data), env)
  c.wait_for("step 5", lambda: len((chain / "metrics.jsonl").read_text().splitlines()) > logged)
  c.p.send_signal(signal.SIGTERM)
  err = c.finish()
  assert "resumed" in err and "at step 4" in err and "stopped by signal" in err, err[-3000:]
  stopped = committed(chain)[-1]
  assert 5 <= stopped < STEPS, stopped

  err = Run(train_cmd(chain, data), env).finish()
  assert f"at step {stopped}" in err and "resumed" in err
  assert committed(chain)[-1] == STEPS

  a_, b_ = saved_state(straight, STEPS), saved_state(chain, STEPS)
  assert sorted(a_) == sorted(b_)
  assert any(k.startswith("state/ema/") for k in a_) and any(k.startswith("state/opt_state/") for k in a_)
  for k in a_:
    assert a_[k].dtype == b_[k].dtype and a_[k].tobytes() == b_[k].tobytes(), k
  assert item_files(straight, STEPS, "data") == item_files(chain, STEPS, "data")  # the data iterator

  m_a, m_b = metrics(straight), metrics(chain)
  assert sorted(m_a) == sorted(m_b) == list(range(1, STEPS + 1))
  for step in m_a:
    for k in ("loss", "ce", "mse", "grad_norm", "lr", "samples"):
      assert m_a[step][k] == m_b[step][k], (step, k, m_a[step][k], m_b[step][k])


def test_nonfinite_streak_stops_the_run(shared):
  """Every loss non-finite (NaN images): updates are skipped and counted, and after
  train.max_nonfinite_streak in a row the run stops with a one-line message and exit status 2."""
  root, data, env = shared
  work = root / "nan"
  r = subprocess.run(train_cmd(work, data, "--config.debug.nonfinite_batches=true", "--config.train.max_nonfinite_streak=3"),
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      "bagel_jax.train: error: 3 steps in a row had a non-finite loss or gradient (last at step 3); stopping. "
      "Lower the learning rate or check the data.")
  logged = metrics(work)
  assert [logged[s]["nonfinite_updates"] for s in sorted(logged)] == [1, 2]
  assert all(not np.isfinite(logged[s]["loss"]) for s in logged)
