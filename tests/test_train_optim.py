"""The optimizer (schedules, frozen subtrees, freeze_und's expert slices) and starting a fine-tune
directly from a release-format folder (the bundled tiny fixture)."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax import train
from bagel_jax.train import loop, optim
from bagel_jax.api import BagelModel
from bagel_jax.config import bagel_tiny

REPO = pathlib.Path(__file__).resolve().parent.parent


def _cfg(**kw):
  c = train.base_config().optim
  c.lr, c.warmup_steps, c.eps = 1e-2, 0, 1e-8
  for k, v in kw.items():
    c[k] = v
  return c


def _update(c):
  params = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), BagelModel(bagel_tiny()).abstract_params()["bagel"])
  tx, _ = optim.make_optimizer(c, params, 100)
  grads = jax.tree.map(jnp.ones_like, params)
  upd, _ = tx.update(grads, tx.init(params), params)
  return upd


def test_schedules():
  s = optim.schedule(_cfg(warmup_steps=10), 100)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(5e-3) and float(s(10)) == pytest.approx(1e-2)
  assert float(s(99)) == pytest.approx(1e-2)
  s = optim.schedule(_cfg(warmup_steps=10, schedule="cosine", min_lr=1e-4), 110)
  assert float(s(10)) == pytest.approx(1e-2) and float(s(60)) == pytest.approx((1e-2 + 1e-4) / 2, rel=1e-3)
  assert float(s(110)) == pytest.approx(1e-4)


def test_frozen_subtrees():
  upd = _update(_cfg(freeze_vit=True))
  assert not np.any(upd["vit"]["layers"]["fc1"]["kernel"])
  assert np.all(upd["connector"]["fc1"]["kernel"] != 0)  # upstream trains the connector under freeze_vit
  assert not np.any(upd["latent_pos_embed"]) and not np.any(upd["vit_pos_embed"])  # always frozen
  upd = _update(_cfg(freeze_llm=True))
  assert not np.any(upd["llm"]["layers"]["q_proj"]["kernel"]) and not np.any(upd["llm"]["lm_head"])
  assert np.all(upd["vae2llm"]["kernel"] != 0)


def test_freeze_und_zeroes_the_und_expert():
  upd = _update(_cfg(freeze_und=True))
  q = np.asarray(upd["llm"]["layers"]["q_proj"]["kernel"])  # [layer, expert, in, out]
  assert not np.any(q[:, 0]) and np.all(q[:, 1] != 0)
  norm = np.asarray(upd["llm"]["norm"])  # [expert, D]
  assert not np.any(norm[0]) and np.all(norm[1] != 0)
  assert not np.any(upd["llm"]["embed_tokens"]) and not np.any(upd["vit"]["patch_embedding"]["kernel"])
  assert np.all(upd["llm2vae"]["kernel"] != 0) and np.all(upd["time_embedder"]["mlp_in"]["kernel"] != 0)


def test_upstream_adamw_defaults():
  c = train.base_config().optim
  assert (c.b1, c.b2, c.eps, c.weight_decay, c.clip) == (0.9, 0.95, 1e-15, 0.0, 1.0)


def _tiny_setup(tmp_path, checkpoint) -> train.Setup:
  """configs/tiny.py with `checkpoint` as model and init checkpoint, prepared (nothing compiled)."""
  spec = importlib.util.spec_from_file_location("tiny_cfg", REPO / "configs" / "tiny.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.model.checkpoint = c.init.checkpoint = str(checkpoint)
  for g in c.data.groups.values():
    g.data_dir = str(tmp_path / "tfds")
  c.train.mesh = "fsdp=2,tensor=4"  # 2 batch shards for the config's 2 rows (8 fake devices)
  return train.prepare(c, tmp_path / "w")


def _assert_same_params(bagel, vae, ref):
  for got, want in ((bagel, ref["bagel"]), (vae, ref["vae"])):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_init_from_release_folder(tmp_path, fixture_dir):
  setup = _tiny_setup(tmp_path, fixture_dir)
  model = BagelModel(setup.model_cfg)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = model.abstract_params()
  bagel, vae = loop.init_params(setup, model, None, jax.tree.map(lambda _: dev, abstract["bagel"]),
                                  jax.tree.map(lambda _: dev, abstract["vae"]))
  _assert_same_params(bagel, vae, model.load_upstream(fixture_dir))


def test_init_from_converted_orbax_folder(tmp_path, fixture_dir):
  """init.checkpoint may be a folder converted by convert.safetensors_to_orbax: same parameters, placed by the rules."""
  from bagel_jax import sharding as shd
  from convert.safetensors_to_orbax import convert
  converted = tmp_path / "orbax"
  convert(fixture_dir, converted, progress=False)
  setup = _tiny_setup(tmp_path, converted)
  model = BagelModel(setup.model_cfg)
  mesh = shd.make_mesh("fsdp=4,tensor=2")
  abstract = model.abstract_params()
  sh = shd.param_shardings(abstract["bagel"], mesh)
  repl = jax.sharding.NamedSharding(mesh, jax.P())
  bagel, vae = loop.init_params(setup, model, None, sh, jax.tree.map(lambda _: repl, abstract["vae"]))
  _assert_same_params(bagel, vae, model.load_upstream(fixture_dir))
  assert jax.tree.all(jax.tree.map(lambda a, s: a.sharding == s and a.dtype == jax.numpy.float32, bagel, sh))
