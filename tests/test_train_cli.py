"""Bad input is refused on the command line with exactly one stderr line and exit code 2, before
anything runs on a device.

Every case is a real `python -m bagel_jax.train ...` process: `tests/cli_runner.py` imports the
libraries once and forks one process per case (runpy, as `python -m` does), so a case costs a
fork, not an interpreter start. In each case process every lowering or compilation of a
computation (jitted or op by op) and every host-to-device transfer is refused and recorded, so
"before anything compiles" is checked, not assumed. 8 CPU devices, as the other tests.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PREFIX = "bagel_jax.train: error: "
PRELOAD = "jax,numpy,ml_collections,absl.flags,orbax.checkpoint,grain,pyarrow.parquet,bagel_jax.train.loop"

# A config file for the cases on one small parquet group; `:name` picks a variant (ml_collections'
# `--config file.py:arg` passes it to get_config).
CONFIG = '''
from bagel_jax.train import base_config


def get_config(variant=""):
  c = base_config()
  c.model.preset = "tiny"
  c.data.vae_max_size, c.data.vae_min_size, c.data.vit_max_size, c.data.vit_min_size = 32, 32, 28, 28
  c.data.groups = {"t2i": dict(format="t2i_parquet", path=DATA + "/one", weight=1.0)}
  if variant == "empty":
    c.data.groups.t2i.path = DATA + "/empty"
  if variant == "missing":
    c.data.groups = {"t2i": dict(format="t2i_parquet", path="/no/such/folder", weight=1.0)}
  if variant == "csv":
    c.data.groups = {"x": dict(format="csv", path=DATA + "/one")}
  if variant == "rules":
    c.train.mesh = "fsdp=8"
    c.train.sharding_rules = {"mlp": "model"}
  return c
'''


def cases(cfg: pathlib.Path, work: pathlib.Path) -> dict[str, tuple[list[str], str]]:
  """name -> (arguments, the one stderr line expected: exact, or a prefix ending in '...')."""
  c = lambda variant="", *over: ["--config", f"{cfg}:{variant}" if variant else str(cfg), "--workdir", str(work), *over]
  return {
      "unknown key": (c("", "--config.train.stepz=3"),
                      "unknown config key 'train.stepz': train has no 'stepz'; did you mean train.steps?"),
      "unknown section": (c("", "--config.optimm.lr=3"),
                          "unknown config key 'optimm.lr': the config has no 'optimm'; did you mean optim?"),
      "missing dataset": (c("missing"), "data group 't2i': /no/such/folder: dataset path does not exist"),
      "empty dataset": (c("empty"), "data group 't2i': the dataset is empty..."),
      "VAE beyond the table": (c("", "--config.data.vae_max_size=128"),
                               "data group 't2i': VAE images up to 128 px give 16 latent tokens per side, beyond "
                               "the latent position table (max_latent_size=8..."),
      "ViT beyond the table": (c("", "--config.data.vit_max_size=980"),
                               "data group 't2i': ViT images up to 980 px give 70 patches per side, beyond the ViT "
                               "position table (vit_max_num_patch_per_side=8..."),
      "bad schedule": (c("", "--config.optim.schedule=linear"), "optim.schedule='linear'..."),
      "bad format": (c("csv"), "data group 'x': format 'csv' is not one of..."),
      "bad preset": (c("", "--config.model.preset=huge"), "model.preset='huge'..."),
      "rows vs mesh": (c("", "--config.data.rows=4", "--config.train.mesh=data=2,fsdp=4"),
                       "data.rows=4 does not split over the batch mesh axes (data=2 x fsdp=4 x tensor=1: 8 shards)..."),
      "mesh vs devices": (c("", "--config.train.mesh=fsdp=3"), "train.mesh='fsdp=3': mesh ... needs 3 devices, 8 are available..."),
      "bad sharding rule": (c("rules"), "...'model' is not a mesh axis..."),
      "no gradient accumulation": (c("", "--config.train.grad_accum_steps=0"), "train.grad_accum_steps=0 must be at least 1..."),
  }


def _matches(line: str, want: str) -> bool:
  """`want` is exact, or has '...' where anything may stand."""
  parts = want.split("...")
  if len(parts) == 1:
    return line == want
  pos = 0
  for i, part in enumerate(parts):
    at = line.find(part, pos) if i else (0 if line.startswith(part) else -1)
    if at < 0:
      return False
    pos = at + len(part)
  return parts[-1] == "" or line.endswith(parts[-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("train_cli")
  schema = pa.schema([("image", pa.binary()), ("captions", pa.string())])
  for name, rows in (("one", [{"image": b"x", "captions": "{}"}]), ("empty", [])):
    (tmp / name).mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp / name / "part.parquet")
  cfg = tmp / "cfg.py"
  cfg.write_text(f"DATA = {str(tmp)!r}\n" + CONFIG)
  table = cases(cfg, tmp / "work")
  run_cases = {k: args for k, (args, _) in table.items()}
  run_cases["accepted config"] = ["--config", str(cfg), "--workdir", str(tmp / "accepted"), "--config.data.rows=8"]
  (tmp / "cases.json").write_text(json.dumps(run_cases))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, str(REPO / "tests" / "cli_runner.py"), "bagel_jax.train", str(tmp / "cases.json"),
                      str(tmp / "out.json"), "--guard", f"--preload={PRELOAD}"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return table, json.loads((tmp / "out.json").read_text()), tmp / "work"


def test_every_bad_config_is_one_line_and_exit_2_before_any_compile(results):
  table, got, work = results
  failures = []
  for name, (_, want) in table.items():
    r = got[name]
    lines = r["stderr"].splitlines()
    if r["device_work"]:
      failures.append(f"{name}: ran on a device before refusing: {r['device_work']}")
    if r["code"] != 2 or len(lines) != 1 or not _matches(lines[0], PREFIX + want):
      failures.append(f"{name}: exit {r['code']}, stderr {r['stderr'][-1500:]!r}")
  assert not failures, "\n".join(failures)
  assert not (work / "checkpoints").exists()  # nothing half-made


def test_the_guard_catches_the_trainers_device_work(results):
  """The guard is real: with a config it accepts, the trainer's first computation is caught."""
  _, got, _ = results
  r = got["accepted config"]
  assert r["code"] == 1 and "device work before the input was refused" in r["stderr"], r["stderr"][-2000:]
  assert r["device_work"], r
