"""Upstream's model arguments beyond the pre-training defaults: --interpolate_pos True, --llm_qk_norm False,
--tie_word_embeddings True (position ids, converter, key table, loaders, exporters, model)."""

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax import layout as L
from bagel_jax.api import BagelModel
from bagel_jax.config import bagel_tiny, load_config
from bagel_jax.image import navit_position_ids, patchify
from bagel_jax.model.bagel import Batch
from bagel_jax.weights.safetensors_io import read_safetensors
from convert import hf_to_bagel
from tests.test_hf_init import FIX
from tests.test_hf_to_bagel import ARGS, same_params

IDS = pathlib.Path(__file__).parent / "fixtures" / "interpolate_pos" / "ids.npz"
FLAGS = ["--llm_qk_norm", "False", "--tie_word_embeddings", "True", "--interpolate_pos", "True"]
EMBED, LM_HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"


# ----------------------------------------------------------------------------- interpolate_pos: position ids
def _upstream_interpolate(h: int, w: int, m: int) -> np.ndarray:
  """Upstream's get_flattened_position_ids_interpolate (data/data_utils.py:61 at 056b5fd), re-derived
  element by element: torch.arange on CPU (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp: blocks of
  16 as two 8-float vectors float32(start + step*i0) + k*step, then the tail start + step*i, float32)
  and torch.bucketize(right=True) = how many boundaries are <= x."""
  def arange(start, end, step):
    n, out, i = math.ceil((end - start) / step), [], 0
    while i + 16 <= n:
      for v0 in (i, i + 8):
        base = float(np.float32(start + step * v0))
        out += [np.float32(base + k * step) for k in range(8)]
      i += 16
    return out + [np.float32(start + step * j) for j in range(i, n)]

  bounds = arange(1 / m, 1.0, 1 / m)
  bucket = lambda x: sum(1 for b in bounds if b <= x)  # noqa: E731
  rows = [bucket(x) for x in arange(0, 1 - 1e-6, 1 / h)]
  cols = [bucket(x) for x in arange(0, 1 - 1e-6, 1 / w)]
  return np.asarray([r * m + c for r in rows for c in cols])


SHAPES = [(1, 1, 1), (5, 3, 5), (3, 7, 4), (25, 49, 70), (50, 55, 70), (70, 70, 70), (98, 133, 70), (64, 40, 64),
          (7, 32, 32)]


@pytest.mark.parametrize("h,w,m", SHAPES)
def test_interpolated_ids_are_upstreams(h, w, m):
  got = navit_position_ids(h, w, m, interpolate=True)
  assert got.dtype == np.int32 and got.shape == (h * w,) and got.min() >= 0 and got.max() < m * m
  np.testing.assert_array_equal(got, _upstream_interpolate(h, w, m))


def test_interpolated_ids_equal_torchs_recorded_ones():
  """tests/fixtures/interpolate_pos/ids.npz: upstream's function run under torch 2.13 (see its CASES.md)."""
  with np.load(IDS) as d:
    assert len(d.files) >= 9
    for name in d.files:
      (h, w), m = map(int, name.split("/")[0].split("x")), int(name.split("/")[1])
      np.testing.assert_array_equal(navit_position_ids(h, w, m, interpolate=True), d[name], err_msg=name)
  # torch's float32 rounding matters: floor(i * m / h) in exact arithmetic gives other ids here.
  rows = np.asarray([i * 70 // 25 for i in range(25)])
  assert not np.array_equal(navit_position_ids(25, 1, 70, interpolate=True), rows * 70)


def test_interpolate_pos_changes_only_the_position_ids_of_a_layout():
  cfg = bagel_tiny()
  plan = [L.Text([1, 2]), L.VitImage((3, 5)), L.Text([3], loss=True), L.VaeImage((2, 3), loss=True), L.VaeImage((2, 3))]
  a = L.pack([[plan]], L.Capacity(tokens=48), cfg.tokens, **L.position_args(cfg))
  b = L.pack([[plan]], L.Capacity(tokens=48), cfg.tokens, **L.position_args(cfg.replace(interpolate_pos=True)))
  for f in dataclasses.fields(a):
    x, y = np.asarray(getattr(a, f.name)), np.asarray(getattr(b, f.name))
    if f.name in ("vit_position_ids", "latent_position_ids"):
      assert not np.array_equal(x, y), f.name
    else:
      np.testing.assert_array_equal(x, y, err_msg=f.name)
  np.testing.assert_array_equal(b.vit_position_ids[0], navit_position_ids(3, 5, 8, True))
  np.testing.assert_array_equal(b.latent_position_ids[0], np.tile(navit_position_ids(2, 3, 8, True), 2))
  # Training takes each latent token from its image's own (row, col), not from the position id.
  p = cfg.latent_patch_size
  lat = np.random.default_rng(0).standard_normal((1, 2, 2 * p, 3 * p, cfg.vae.z_channels)).astype(np.float32)
  want = np.concatenate([patchify(lat[0, i], p) for i in range(2)])
  for lay in (a, b):
    np.testing.assert_array_equal(np.asarray(BagelModel(cfg).latent_tokens(jnp.asarray(lat), lay))[0, :12], want)
  big = [[[L.VitImage((9, 12))]]]  # beyond the 8x8 table: upstream interpolates it, extrapolation cannot
  assert L.pack(big, L.Capacity(tokens=120), cfg.tokens, **L.position_args(cfg.replace(interpolate_pos=True))
                ).vit_position_ids.max() < 64
  with pytest.raises(L.LayoutError, match="vit_max_num_patch_per_side=8"):
    L.pack(big, L.Capacity(tokens=120), cfg.tokens, **L.position_args(cfg))



def test_inference_context_uses_interpolated_ids():
  """generate / chat lay their context images out with `kv_cache.build_chunk`: the config's ids."""
  from bagel_jax.inference import kv_cache as kc
  cfg = bagel_tiny().replace(interpolate_pos=True)
  vit = kc.VitSegment(np.zeros((3 * 5, cfg.vit.patch_dim), np.float32), (3, 5))
  vae = kc.VaeSegment(np.zeros((2 * 7, cfg.patch_latent_dim), np.float32), (2, 7))
  chunk = kc.build_chunk([[kc.TextSegment((4, 5)), vit, vae]], [0], cfg, exact=True)
  np.testing.assert_array_equal(chunk.vit_pos[0], navit_position_ids(3, 5, cfg.vit_max_num_patch_per_side, True))
  np.testing.assert_array_equal(chunk.vae_pos[0], navit_position_ids(2, 7, cfg.max_latent_size, True))
  assert not np.array_equal(chunk.vae_pos[0], navit_position_ids(2, 7, cfg.max_latent_size))

# ----------------------------------------------------------------------------- the converter with all three flags
@pytest.fixture(scope="module")
def flagged(tmp_path_factory):
  out = tmp_path_factory.mktemp("hf_flags")
  for fmt in ("safetensors", "orbax"):
    hf_to_bagel.main([str(a) for a in ARGS + FLAGS + ["--dst", out / fmt, "--format", fmt]])
  cfg = load_config(out / "safetensors")
  return out, cfg, BagelModel(cfg, attention_impl="reference").load_upstream(out / "safetensors")


def test_converted_folder_has_no_qk_norm_and_a_tied_lm_head(flagged):
  out, cfg, params = flagged
  assert (cfg.llm.qk_norm, cfg.llm.tie_word_embeddings, cfg.interpolate_pos) == (False, True, True)
  assert load_config(out / "orbax") == cfg
  ema, expected = read_safetensors(out / "safetensors/ema.safetensors"), read_safetensors(FIX / "expected/ema.safetensors")
  assert set(ema) == {k for k in expected if "q_norm" not in k and "k_norm" not in k}  # lm_head listed, as upstream
  np.testing.assert_array_equal(ema[LM_HEAD], ema[EMBED])
  np.testing.assert_array_equal(ema[EMBED], expected[EMBED])  # the checkpoint's own lm_head is not used
  assert not np.array_equal(ema[LM_HEAD], expected[LM_HEAD])
  llm = params["bagel"]["llm"]
  assert "lm_head" not in llm and "q_norm" not in llm["layers"] and "k_norm" not in llm["layers"]
  from bagel_jax.weights.load import load_checkpoint
  same_params(load_checkpoint(out / "orbax"), params)


def test_orbax_safetensors_round_trip_keeps_the_flags(flagged, tmp_path):
  from convert.orbax_to_safetensors import export
  from convert.safetensors_to_orbax import convert
  from bagel_jax.weights.load import load_checkpoint
  out, cfg, params = flagged
  export(out / "orbax", tmp_path / "back", progress=False)
  back, ema = read_safetensors(tmp_path / "back/ema.safetensors"), read_safetensors(out / "safetensors/ema.safetensors")
  assert set(back) == set(ema) and load_config(tmp_path / "back") == cfg
  for k, x in ema.items():  # the export writes the release's bf16
    np.testing.assert_array_equal(back[k].astype(np.float32), x.astype(jnp.bfloat16).astype(np.float32), err_msg=k)
  convert(tmp_path / "back", tmp_path / "again", progress=False)
  bf16 = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), params)
  bf16["vae"] = params["vae"]
  same_params(jax.tree.map(lambda x: np.asarray(x, np.float32), load_checkpoint(tmp_path / "again")), bf16)


def _batch(cfg, rng) -> Batch:
  plan = [L.Text([5, 6, 7]), L.VitImage((3, 4)), L.Text([8, 9], loss=True), L.VaeImage((2, 3), loss=True)]
  lay = L.pack([[plan]], L.Capacity(tokens=32), cfg.tokens, **L.position_args(cfg))
  nv, nl = lay.vit_indexes.shape[1], lay.vae_indexes.shape[1]
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
  return Batch(layout=jax.tree.map(jnp.asarray, lay), vit_patches=f(1, nv, cfg.vit.patch_dim),
               vae_latents=f(1, nl, cfg.latent_patch_size ** 2 * cfg.vae.z_channels),
               noise=f(1, nl, cfg.latent_patch_size ** 2 * cfg.vae.z_channels), timesteps=jnp.full((1, nl), 0.5))


def test_flagged_model_forward_runs_with_embed_tokens_as_lm_head(flagged):
  _, cfg, params = flagged
  batch = _batch(cfg, np.random.default_rng(0))
  np.testing.assert_array_equal(batch.layout.vit_position_ids[0], navit_position_ids(3, 4, 5, True))
  np.testing.assert_array_equal(batch.layout.latent_position_ids[0], navit_position_ids(2, 3, 32, True))
  out = jax.jit(BagelModel(cfg, attention_impl="reference").forward)(params, batch)
  assert np.isfinite(np.asarray(out.hidden)).all()
  h = jnp.take_along_axis(out.hidden, batch.layout.ce_indexes[..., None], axis=1)
  np.testing.assert_allclose(out.ce_logits, jnp.einsum("bnd,vd->bnv", h, params["bagel"]["llm"]["embed_tokens"]),
                             rtol=1e-5, atol=1e-5)


def test_no_qk_norm_layer_uses_the_raw_projections(flagged):
  """llm_qk_norm=False: q/k go to RoPE as projected (upstream's nn.Identity), in both experts."""
  from bagel_jax.model.embeddings import apply_rope, rope_cos_sin
  from bagel_jax.model.qwen2_mot import (AttentionSpec, DecoderOptions, decoder_layer, rms_normalize,
                                          route_tokens)
  _, cfg, params = flagged
  llm, t = cfg.llm, 6
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, t, llm.hidden_size)), jnp.float32)

  @jax.jit
  def keys(p):
    experts = (jnp.arange(4)[None], jnp.arange(4, t)[None])
    cos, sin = rope_cos_sin(jnp.arange(t)[None], llm.head_dim, llm.rope_theta)
    z, n = jnp.zeros((1, t), jnp.int32), jnp.full((1, t), t)
    _, (k, _) = decoder_layer(llm, p, x, route_tokens(experts, t), cos, sin, AttentionSpec(z, n, z, n), None,
                              DecoderOptions("reference"), jnp.float32)
    h = rms_normalize(x, llm.rms_norm_eps)
    raw = [(h * p["input_layernorm"][e]) @ p["k_proj"]["kernel"][e] + p["k_proj"]["bias"][e] for e in range(2)]
    raw = jnp.where((jnp.arange(t) < 4)[None, :, None], raw[0], raw[1]).reshape(k.shape)
    return k, apply_rope(raw, cos, sin), apply_rope(rms_normalize(raw, llm.rms_norm_eps), cos, sin)

  k, want, normed = keys(jax.tree.map(lambda a: a[0], params["bagel"]["llm"]["layers"]))
  np.testing.assert_allclose(k, want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(normed - want)).max() > 1e-2  # what qk_norm (ones) would have given instead


def test_trainer_init_hf_takes_the_three_flags(tmp_path):
  from bagel_jax.data.pipeline import pack_spec
  from bagel_jax.train.config import model_config
  from tests.test_train_init_hf import _tiny_hf
  config = _tiny_hf(tmp_path, interpolate_pos=True, llm_qk_norm=False, tie_word_embeddings=True)
  cfg = model_config(config)
  assert (cfg.interpolate_pos, cfg.llm.qk_norm, cfg.llm.tie_word_embeddings) == (True, False, True)
  assert pack_spec(config.data, cfg, rows=1).interpolate_pos  # the packer of the training batches interpolates
