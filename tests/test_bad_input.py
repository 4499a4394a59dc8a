"""Bad checkpoint folders and oversized images get one-line errors that name the culprit."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bagel_jax import layout as L
from bagel_jax.api import BagelModel
from bagel_jax.config import ConfigError, bagel_tiny, load_config
from bagel_jax.weights import CheckpointError
from tests.conftest import FIXTURE_DIR

KEY = "language_model.model.layers.1.self_attn.k_proj_moe_gen.weight"


@pytest.fixture
def folder(tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(FIXTURE_DIR, dst)
  for f in dst.iterdir():
    f.chmod(0o644)
  return dst


def _rewrite_ema(folder, fn):
  tensors = load_file(str(folder / "ema.safetensors"))
  fn(tensors)
  save_file(tensors, str(folder / "ema.safetensors"))


def _load(folder):
  return BagelModel(bagel_tiny()).load_upstream(folder)


def _one_line(exc):
  msg = str(exc.value)
  assert "\n" not in msg
  return msg


def test_missing_file(folder):
  (folder / "ae.safetensors").unlink()
  with pytest.raises(CheckpointError) as e:
    _load(folder)
  assert "ae.safetensors" in _one_line(e) and "not found" in str(e.value)


def test_missing_config(folder):
  (folder / "vit_config.json").unlink()
  with pytest.raises(ConfigError) as e:
    load_config(folder)
  assert "vit_config.json" in _one_line(e)


def test_missing_key(folder):
  _rewrite_ema(folder, lambda t: t.pop(KEY))
  with pytest.raises(CheckpointError) as e:
    _load(folder)
  assert f"missing key {KEY}" in _one_line(e)


def test_unexpected_key(folder):
  _rewrite_ema(folder, lambda t: t.__setitem__("language_model.model.extra.weight", t[KEY]))
  with pytest.raises(CheckpointError) as e:
    _load(folder)
  assert "unexpected key language_model.model.extra.weight" in _one_line(e)


def test_wrong_shape(folder):
  _rewrite_ema(folder, lambda t: t.__setitem__(KEY, t[KEY][:, :-1].copy()))
  with pytest.raises(CheckpointError) as e:
    _load(folder)
  msg = _one_line(e)
  assert KEY in msg and "[32, 63]" in msg and "[32, 64]" in msg


def test_wrong_dtype(folder):
  _rewrite_ema(folder, lambda t: t.__setitem__(KEY, t[KEY].astype(np.float16)))
  with pytest.raises(CheckpointError) as e:
    _load(folder)
  msg = _one_line(e)
  assert KEY in msg and "F16" in msg and "BF16" in msg


def test_oversized_images_refused_before_device_work():
  cfg = bagel_tiny()
  with pytest.raises(L.LayoutError, match="vit_max_num_patch_per_side=8") as e:
    L.pack([[[L.VitImage((9, 2))]]], L.Capacity(tokens=64), cfg.tokens, max_patches_per_side=8, max_latent_size=8)
  assert "\n" not in str(e.value)
  with pytest.raises(L.LayoutError, match="max_latent_size=8"):
    L.pack([[[L.VaeImage((2, 9), loss=True)]]], L.Capacity(tokens=64), cfg.tokens, max_patches_per_side=8,
           max_latent_size=8)
