"""Parity of the packed training forward with upstream on the bagel_tiny_a fixture (float32)."""

import jax
import numpy as np
import pytest

from bagel_jax import layout as L
from bagel_jax.api import BagelModel
from bagel_jax.config import load_config
from bagel_jax.demo import fixture_batch
from tests.conftest import FIXTURE_DIR, rel_err

TOL = 1e-4  # CASES.md: max(1e-4, 10 x the float32 noise floor 3.7e-7)


@pytest.fixture(scope="module")
def setup(cases):
  cfg = load_config(FIXTURE_DIR)
  model = BagelModel(cfg, attention_impl="reference")
  params = model.load_upstream(FIXTURE_DIR)
  batch, latents = fixture_batch(FIXTURE_DIR, cases, model, params)
  lay = batch.layout
  out = jax.jit(model.forward)(params, batch)
  total, parts = jax.jit(model.loss)(params, batch)
  return dict(model=model, params=params, layout=lay, latents=latents, batch=batch, out=out, parts=parts,
              total=total)


def test_padded_latent(setup, cases):
  assert rel_err(setup["latents"], cases["train/padded_latent"].transpose(0, 2, 3, 1)) < TOL


def test_layout_matches_fixture(setup, cases):
  lay = setup["layout"]
  n = lay.length
  np.testing.assert_array_equal(L.dense_mask_np(lay), cases["train/dense_mask"].astype(bool))
  np.testing.assert_array_equal(lay.rope_ids[0], cases["train/position_ids"])
  np.testing.assert_array_equal(lay.ce_indexes[0], cases["train/ce_indexes"])
  np.testing.assert_array_equal(lay.ce_labels[0], cases["train/label_ids"])
  np.testing.assert_array_equal(lay.vae_indexes[0], cases["train/vae_indexes"])
  np.testing.assert_array_equal(lay.vae_indexes[0][np.asarray(lay.vae_noisy[0]) == 1], cases["train/mse_indexes"])
  assert n == int(cases["train/sequence_length"][0])


@pytest.mark.parametrize("name,key", [("llm_input", "train/llm_input"), ("hidden", "train/hidden")])
def test_hidden_states(setup, cases, name, key):
  assert rel_err(getattr(setup["out"], name)[0], cases[key]) < TOL


def test_ce_logits(setup, cases):
  assert rel_err(setup["out"].ce_logits[0], cases["train/ce_logits"]) < TOL
  assert rel_err(setup["parts"].ce_per_token[0], cases["train/ce"]) < TOL


def test_velocity_and_mse(setup, cases):
  noisy = np.asarray(setup["layout"].vae_noisy[0]) == 1
  assert rel_err(np.asarray(setup["out"].velocity[0])[noisy], cases["train/mse_pred"]) < TOL
  target = np.asarray(setup["batch"].noise[0] - setup["batch"].vae_latents[0])[noisy]
  mse = (np.asarray(setup["out"].velocity[0])[noisy] - target) ** 2
  assert rel_err(mse, cases["train/mse"]) < TOL


def test_losses(setup, cases):
  assert rel_err(setup["parts"].ce, cases["train/ce_loss"]) < TOL
  assert rel_err(setup["parts"].mse, cases["train/mse_loss"]) < TOL
  assert rel_err(setup["total"], cases["train/ce_loss"] + cases["train/mse_loss"]) < TOL


def test_xla_chunked_matches_reference(setup):
  model = BagelModel(setup["model"].cfg, attention_impl="xla_chunked")
  out = jax.jit(model.forward)(setup["params"], setup["batch"])
  assert rel_err(out.hidden, setup["out"].hidden) < 1e-5
