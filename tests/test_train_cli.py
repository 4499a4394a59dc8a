"""Bad input is refused with a one-line message before anything compiles.

Unknown config keys are checked on the command line (a subprocess: the real CLI message and exit
code); the others through `train.run` in-process with `jax.jit` made to fail if it is ever
reached, so "before any compilation" is checked, not assumed.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bagel_jax import train
from bagel_jax.data.sources import DataError
from bagel_jax.sharding import ShardingError

REPO = pathlib.Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "bagel_jax.train", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


def test_unknown_config_key_cli(tmp_path):
  r = _cli("--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(tmp_path), "--config.train.stepz=3")
  assert r.returncode == 2
  assert r.stderr.strip() == ("bagel_jax.train: error: unknown config key 'train.stepz': train has no 'stepz'; "
                              "did you mean train.steps?")
  r = _cli("--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(tmp_path), "--config.optimm.lr=3")
  assert r.returncode == 2 and "did you mean optim" in r.stderr and "Traceback" not in r.stderr


def test_missing_dataset_path_cli(tmp_path):
  cfg = tmp_path / "cfg.py"
  cfg.write_text("from bagel_jax.train import base_config\n"
                 "def get_config():\n"
                 "  c = base_config()\n"
                 "  c.data.vae_max_size, c.data.vae_min_size, c.data.vit_max_size, c.data.vit_min_size = 32, 32, 28, 28\n"
                 "  c.data.groups = {'t2i': dict(format='t2i_parquet', path='/no/such/folder', weight=1.0)}\n"
                 "  return c\n")
  r = _cli("--config", str(cfg), "--workdir", str(tmp_path / "w"))
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip() == "bagel_jax.train: error: data group 't2i': /no/such/folder: dataset path does not exist"


@pytest.fixture
def no_compile(monkeypatch):
  """Any jitted function called (= compiled) fails the test."""
  def fake_jit(fun=None, *a, **k):
    if fun is None:
      return lambda f: fake_jit(f)

    def refuse(*args, **kwargs):
      raise AssertionError(f"{getattr(fun, '__name__', fun)} was compiled before the bad input was refused")
    return refuse
  monkeypatch.setattr(jax, "jit", fake_jit)


def _config(groups, **data):
  c = train.base_config()
  c.model.preset = "tiny"
  c.data.groups = groups
  c.data.vae_max_size, c.data.vae_min_size, c.data.vit_max_size, c.data.vit_min_size = 32, 32, 28, 28
  for k, v in data.items():
    c.data[k] = v
  return c


def _parquet(path: pathlib.Path, rows: list[dict], schema=None) -> None:
  table = pa.Table.from_pylist(rows, schema=schema)
  pq.write_table(table, path)


def test_empty_dataset(tmp_path, no_compile):
  schema = pa.schema([("image", pa.binary()), ("captions", pa.string())])
  _parquet(tmp_path / "empty.parquet", [], schema)
  c = _config({"t2i": dict(format="t2i_parquet", path=str(tmp_path), weight=1.0)})
  with pytest.raises(DataError, match=r"^data group 't2i': the dataset is empty"):
    train.run(c, tmp_path / "w")


def test_image_beyond_position_tables(tmp_path, no_compile):
  schema = pa.schema([("image", pa.binary()), ("captions", pa.string())])
  _parquet(tmp_path / "one.parquet", [{"image": b"x", "captions": "{}"}], schema)
  c = _config({"t2i": dict(format="t2i_parquet", path=str(tmp_path), weight=1.0)}, vae_max_size=128)
  with pytest.raises(DataError, match=r"VAE images up to 128 px give 16 latent tokens per side, beyond the "
                                      r"latent position table \(max_latent_size=8"):
    train.run(c, tmp_path / "w")
  c = _config({"t2i": dict(format="t2i_parquet", path=str(tmp_path), weight=1.0)}, vit_max_size=980)
  with pytest.raises(DataError, match=r"ViT images up to 980 px give 70 patches per side, beyond the ViT "
                                      r"position table \(vit_max_num_patch_per_side=8"):
    train.run(c, tmp_path / "w")


def test_bad_values(tmp_path, no_compile):
  schema = pa.schema([("image", pa.binary()), ("captions", pa.string())])
  _parquet(tmp_path / "one.parquet", [{"image": b"x", "captions": "{}"}], schema)
  g = {"t2i": dict(format="t2i_parquet", path=str(tmp_path), weight=1.0)}
  c = _config(g)
  c.optim.schedule = "linear"
  with pytest.raises(ValueError, match="optim.schedule='linear'"):
    train.run(c, tmp_path / "w")
  c = _config({"x": dict(format="csv", path=str(tmp_path))})
  with pytest.raises(DataError, match="format 'csv' is not one of"):
    train.run(c, tmp_path / "w")
  c = _config(g)
  c.model.preset = "huge"
  with pytest.raises(train.TrainConfigError, match="model.preset='huge'"):
    train.run(c, tmp_path / "w")


def test_mesh_and_rows_mismatch(tmp_path, no_compile):
  schema = pa.schema([("image", pa.binary()), ("captions", pa.string())])
  _parquet(tmp_path / "one.parquet", [{"image": b"x", "captions": "{}"}], schema)
  c = _config({"t2i": dict(format="t2i_parquet", path=str(tmp_path), weight=1.0)}, rows=4)
  c.train.mesh = "data=2,fsdp=4"  # 8 batch shards for 4 rows
  with pytest.raises(train.TrainConfigError, match=r"^data.rows=4 does not split over the batch mesh axes "
                                                   r"\(data=2 x fsdp=4 x tensor=1: 8 shards\)"):
    train.run(c, tmp_path / "w")
  c.train.mesh = "fsdp=3"
  with pytest.raises(train.TrainConfigError, match=r"^train.mesh='fsdp=3': mesh .* needs 3 devices, 8 are available"):
    train.run(c, tmp_path / "w")
  c.train.mesh = "fsdp=8"
  c.train.sharding_rules = {"mlp": "model"}
  with pytest.raises(ShardingError, match="'model' is not a mesh axis"):
    train.run(c, tmp_path / "w")
  c.train.sharding_rules = {}
  c.train.grad_accum_steps = 0
  with pytest.raises(train.TrainConfigError, match=r"^train.grad_accum_steps=0 must be at least 1"):
    train.run(c, tmp_path / "w")
