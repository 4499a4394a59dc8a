"""Two real processes x 4 CPU devices (jax.distributed, gloo): three train steps and an Orbax
save + restore, equal to the single-process run."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from bagel_jax import sharding as shd
from tests.train_fixtures import FAST_XLA, reference_run, tiny_params

# Both tests start 2 processes x 4 devices: run them one after the other on one xdist worker
# (`--dist loadgroup`), never side by side.
pytestmark = pytest.mark.xdist_group("multiprocess")

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
REPO = WORKER.parents[1]
LAUNCH = REPO / "launch" / "local.sh"
# 8 devices in 2 processes vs 1 device: reduction order only (float32); the tolerances and
# their reasons are those of tests/test_sharding.py.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra) -> dict:
  """The children's environment: no fake-device flags or proxies from here, CPU only, a free port."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",) and "PROXY" not in k.upper()}
  env.update(JAX_PLATFORMS="cpu", PORT=str(_free_port()), **extra)
  return env


def _start_two(cmd: list[str], env: dict) -> subprocess.Popen:
  """launch/local.sh starts 2 processes x 4 CPU devices (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
  return subprocess.Popen(["bash", str(LAUNCH), "2", "--cpu", "4", "--", *cmd], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float) -> str:
  """Both processes' output; kills the group if it outlives the timeout; fails on a non-zero status."""
  try:
    log, _ = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, 9)
  assert proc.returncode == 0, log[-6000:]
  return log


def test_two_processes_train_save_restore(tmp_path):
  params = tiny_params()
  np.savez(tmp_path / "init.npz", **{shd.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)})
  proc = _start_two([sys.executable, str(WORKER), "--workdir", str(tmp_path)], _env(PYTHONPATH=str(REPO)))
  ref_state, ref_metrics = reference_run(3)  # overlaps with the workers' start-up
  log = _wait(proc, 1800)  # generous: both processes compile on a CPU shared with other jobs
  assert "[0] process 0: losses" in log and "[1] process 1: losses" in log, log[-6000:]

  with np.load(tmp_path / "out.npz") as z:
    got = {k: z[k] for k in z.files}
  want = np.asarray([[float(m[k]) for k in ("loss", "ce", "mse", "grad_norm")] for m in ref_metrics])
  np.testing.assert_allclose(got["losses"], want, rtol=LOSS_RTOL)
  assert int(got["step"]) == 3 and bool(got["restored_equal"])
  np.testing.assert_array_equal(got["rng"], ref_state.rng)
  for p, x in jax.tree_util.tree_leaves_with_path(ref_state.params):
    k = shd.path_str(p)
    np.testing.assert_allclose(got[f"params/{k}"], x, atol=PARAM_ATOL, err_msg=k)
    np.testing.assert_array_equal(got[f"restored/{k}"], got[f"params/{k}"], err_msg=k)
  assert (tmp_path / "ckpt" / "3").is_dir()


def test_train_cli_on_two_processes(tmp_path):
  """The README's local launch: `python -m bagel_jax.train` in 2 processes x 4 CPU devices
  (data=2 x fsdp=4, each process feeding its half of the rows), saving from all processes, then
  the same command resumes from the last checkpoint."""
  cache = dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", XLA_FLAGS=FAST_XLA)
  work = tmp_path / "run"

  def launch(steps: int) -> str:
    cmd = [sys.executable, "-m", "bagel_jax.train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(work),
           f"--config.data.groups.t2i.data_dir={tmp_path / 'tfds'}", f"--config.data.groups.qa.data_dir={tmp_path / 'tfds'}",
           "--config.train.mesh=data=2,fsdp=4", "--config.data.rows=8", f"--config.train.steps={steps}",
           "--config.train.save_every=2", "--config.train.log_every=1"]
    return _wait(_start_two(cmd, _env(**cache)), 1800)

  log = launch(2)
  assert "[0]" in log and "[1]" in log and "mesh data=2 x fsdp=4" in log
  assert sorted(int(d.name) for d in (work / "checkpoints").iterdir() if d.name.isdigit()) == [2]
  log = launch(4)
  assert "[0]" in log and "resumed from" in log and "at step 2" in log
  steps = [json.loads(ln) for ln in (work / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in steps] == [1, 2, 3, 4] and all(np.isfinite(m["loss"]) for m in steps)
