"""Sin-cos tables, timestep embedder and RoPE against upstream (bagel_tiny_a fixture, float32)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from bagel_jax.weights import table as weights
from bagel_jax.config import load_config
from bagel_jax.model.embeddings import (FrozenTable, TimestepEmbedder, apply_rope, rope_cos_sin, sincos_2d_table,
                                        timestep_frequencies)
from tests.conftest import FIXTURE_DIR, rel_err

TOL = 1e-4  # CASES.md: max(1e-4, 10 x the float32 noise floor 1.9e-7)


@pytest.fixture(scope="module")
def ema():
  return load_file(str(FIXTURE_DIR / "ema.safetensors"))


def load_submodule(module: nnx.Module, prefix: tuple[str, ...], table, tensors) -> None:
  """Fills `module` (our path `prefix`) from the upstream tensors through the weights table."""
  state = nnx.state(module)
  pure = jax.tree.map(lambda a: np.array(a, np.float32), nnx.to_pure_dict(state))
  used = 0
  for r in table:
    if r.path[:len(prefix)] != prefix:
      continue
    value = weights.to_ours(r.kind, np.asarray(tensors[r.upstream], np.float32))
    parent = weights._get(pure, r.path[len(prefix):-1])
    if r.index:
      parent[r.path[-1]][r.index] = value
    else:
      assert parent[r.path[-1]].shape == value.shape, r.upstream
      parent[r.path[-1]] = value
    used += 1
  assert used
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(module, state)


@pytest.mark.parametrize("name,grid", [("vit_pos_embed", 8), ("latent_pos_embed", 8)])
def test_sincos_tables(cases, ema, name, grid):
  cfg = load_config(FIXTURE_DIR)
  ours = sincos_2d_table(grid, cfg.llm.hidden_size)
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, cases[f"tables/{name}"], rtol=0, atol=1e-6)
  # The checkpoint holds the same table rounded to bf16.
  stored = ema[f"{name}.pos_embed"]
  assert stored.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(stored.view(np.uint16), ours.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_sincos_table_layout():
  g, d = 5, 16
  t = sincos_2d_table(g, d).reshape(g, g, d)
  omega = 10000.0 ** (-np.arange(d // 4) / (d / 4))
  r, c = 3, 1
  want_col = np.concatenate([np.sin(c * omega), np.cos(c * omega)])
  want_row = np.concatenate([np.sin(r * omega), np.cos(r * omega)])
  np.testing.assert_allclose(t[r, c], np.concatenate([want_col, want_row]), atol=1e-7)


def test_timestep_frequencies(cases):
  t = cases["timestep/t"]
  ours = timestep_frequencies(jnp.asarray(t), 256)
  assert ours.dtype == jnp.float32 and ours.shape == (len(t), 256)
  assert rel_err(ours, cases["timestep/frequency_embedding"]) < TOL
  # [cos, sin], cosine first: t = 0 gives ones then zeros.
  np.testing.assert_array_equal(np.asarray(ours[0]), np.r_[np.ones(128), np.zeros(128)])


def test_timestep_embedder(cases, ema):
  cfg = load_config(FIXTURE_DIR)
  emb = TimestepEmbedder(cfg.llm.hidden_size, cfg.frequency_embedding_size, rngs=nnx.Rngs(0))
  load_submodule(emb, ("bagel", "time_embedder"), list(weights._vit_rules(cfg)), ema)
  out = jax.jit(lambda m, t: m(t))(emb, jnp.asarray(cases["timestep/t"]))
  assert rel_err(out, cases["timestep/embedding"]) < TOL


def test_frozen_table_is_not_a_param():
  class M(nnx.Module):
    def __init__(self):
      self.table = FrozenTable(jnp.asarray(sincos_2d_table(2, 8)))
      self.w = nnx.Param(jnp.ones(3))

  m = M()
  assert set(nnx.to_pure_dict(nnx.state(m, nnx.Param))) == {"w"}
  assert set(nnx.to_pure_dict(nnx.state(m))) == {"table", "w"}


def _hf_rope_np(x, pos, theta):
  """HF rotate-half RoPE in float64: x [T, H, D], pos [T]."""
  d = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
  f = pos[:, None] * inv
  emb = np.concatenate([f, f], -1)[:, None]
  rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
  return x * np.cos(emb) + rot * np.sin(emb)


def test_rope_matches_hf_formula():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)
  pos = np.array([[0, 1, 2, 2, 2, 3, 9], [0, 5, 6, 7, 8, 40, 41]], np.int32)
  cos, sin = rope_cos_sin(jnp.asarray(pos), 16, 1e6)
  assert cos.shape == (2, 7, 16) and cos.dtype == jnp.float32
  ours = apply_rope(jnp.asarray(x), cos, sin)
  for b in range(2):
    assert rel_err(ours[b], _hf_rope_np(x[b].astype(np.float64), pos[b].astype(np.float64), 1e6)) < 1e-6
  # A rotation: norms are kept; equal ids give equal rotations.
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
