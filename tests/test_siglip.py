"""SigLIP NaViT, connector and patchify against upstream (bagel_tiny_a fixture, float32),
and the ViT/connector/time-embedder rows of the weights table against the release manifest."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from bagel_jax import image as I
from bagel_jax.weights import table as weights
from bagel_jax.config import ViTConfig, bagel_7b_mot, load_config
from bagel_jax.model.connector import MLPConnector
from bagel_jax.model.embeddings import TimestepEmbedder
from bagel_jax.model.siglip import SiglipVisionModel
from tests.conftest import FIXTURE_DIR, rel_err

TOL = 1e-4  # CASES.md: max(1e-4, 10 x the float32 noise floor 4.1e-7)
MANIFEST = FIXTURE_DIR.parent / "ema_manifest.tsv"
PREFIXES = ("vit_model.", "connector.", "time_embedder.")


class Parts(nnx.Module):
  """The attributes the `Bagel` module holds for these parts, under the same names."""

  def __init__(self, cfg, *, rngs, attention_impl="reference"):
    d = cfg.llm.hidden_size
    self.vit = SiglipVisionModel(cfg.vit, cfg.vit_max_num_patch_per_side, rngs=rngs, attention_impl=attention_impl)
    self.connector = MLPConnector(cfg.vit.hidden_size, d, cfg.connector_act, rngs=rngs)
    self.time_embedder = TimestepEmbedder(d, cfg.frequency_embedding_size, rngs=rngs)


def load_parts(parts: Parts, cfg, tensors) -> None:
  """A small loader: upstream tensors (upcast to float32) -> our parameters, through the table."""
  state = nnx.state(parts)
  pure = {"bagel": jax.tree.map(lambda a: np.array(a, np.float32), nnx.to_pure_dict(state))}
  for r in weights._vit_rules(cfg):
    value = weights.to_ours(r.kind, np.asarray(tensors[r.upstream], np.float32))
    if r.index:
      weights._get(pure, r.path)[r.index] = value
    else:
      assert weights._get(pure, r.path).shape == value.shape, r.upstream
      weights._set(pure, r.path, value)
  nnx.replace_by_pure_dict(state, pure["bagel"])
  nnx.update(parts, state)


@pytest.fixture(scope="module")
def cfg():
  return load_config(FIXTURE_DIR)


@pytest.fixture(scope="module")
def ema():
  return load_file(str(FIXTURE_DIR / "ema.safetensors"))


@pytest.fixture(scope="module")
def parts(cfg, ema):
  p = Parts(cfg, rngs=nnx.Rngs(0))
  load_parts(p, cfg, ema)
  return p


def _images(cases):
  return [cases[f"vit/image{i}"].transpose(1, 2, 0) for i in range(2)]  # [3, H, W] -> [H, W, 3]


# ----------------------------------------------------------------------------- image helpers
def test_patchify_and_position_ids(cases, cfg):
  p, side = cfg.vit.patch_size, cfg.vit_max_num_patch_per_side
  patches, pos, start, end = I.pack_vit_images(_images(cases), p, side)
  np.testing.assert_array_equal(patches, cases["vit/packed_pixel_values"])
  np.testing.assert_array_equal(pos, cases["vit/position_ids"])
  cu = cases["vit/cu_seqlens"]
  for i in range(len(cu) - 1):
    np.testing.assert_array_equal(start[cu[i]:cu[i + 1]], cu[i])
    np.testing.assert_array_equal(end[cu[i]:cu[i + 1]], cu[i + 1])
  # Each image alone, and through jnp.
  off = 0
  for im in _images(cases):
    gh, gw = im.shape[0] // p, im.shape[1] // p
    tok = I.patchify(jnp.asarray(im), p)
    np.testing.assert_array_equal(tok, cases["vit/packed_pixel_values"][off:off + gh * gw])
    np.testing.assert_array_equal(I.navit_position_ids(gh, gw, side), cases["vit/position_ids"][off:off + gh * gw])
    np.testing.assert_array_equal(I.unpatchify(tok, gh, gw, p), im)
    off += gh * gw


def test_patchify_batched_and_latent_order():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 4, 6, 16)).astype(np.float32)  # [..., H, W, C]
  tok = I.patchify(x, 2)
  assert tok.shape == (2, 3, 6, 64)
  # Upstream's latent patchify on [C, H, W]: (c, h, p, w, q) -> (h, w, p, q, c).
  chw = x[1, 2].transpose(2, 0, 1)
  up = np.einsum("chpwq->hwpqc", chw.reshape(16, 2, 2, 3, 2)).reshape(6, 64)
  np.testing.assert_array_equal(tok[1, 2], up)
  np.testing.assert_array_equal(I.unpatchify(tok, 2, 3, 2), x)
  with pytest.raises(ValueError):
    I.patchify(x[..., :3, :, :], 2)
  with pytest.raises(ValueError):
    I.navit_position_ids(9, 2, 8)


# ----------------------------------------------------------------------------- forward parity
def _vit_inputs(cases):
  n = cases["vit/packed_pixel_values"].shape[0]
  cu = cases["vit/cu_seqlens"]
  start = np.repeat(cu[:-1], np.diff(cu)).astype(np.int32)
  end = np.repeat(cu[1:], np.diff(cu)).astype(np.int32)
  assert start.shape == (n,)
  return (jnp.asarray(cases["vit/packed_pixel_values"])[None], jnp.asarray(cases["vit/position_ids"])[None],
          jnp.asarray(start)[None], jnp.asarray(end)[None])


@pytest.fixture(scope="module")
def outputs(parts, cases, ema):
  patches, pos, start, end = _vit_inputs(cases)

  @jax.jit
  def run(parts, patches, pos, start, end):
    emb = parts.vit.embed(patches, pos)
    feats = parts.vit(patches, pos, start, end)
    conn = parts.connector(feats)
    return emb, feats, conn

  emb, feats, conn = run(parts, patches, pos, start, end)
  table = np.asarray(ema["vit_pos_embed.pos_embed"], np.float32)  # as loaded from the checkpoint (bf16-rounded)
  plus = conn + table[cases["vit/position_ids"]][None]
  return {"vit/embeddings": emb[0], "vit/features": feats[0], "vit/connector_out": conn[0],
          "vit/connector_plus_pos": plus[0]}


@pytest.mark.parametrize("key", ["vit/embeddings", "vit/features", "vit/connector_out", "vit/connector_plus_pos"])
def test_vit_parity(outputs, cases, key):
  err = rel_err(outputs[key], cases[key])
  assert err < TOL, err


def test_packing_and_padding_do_not_leak(parts, cases, outputs):
  """Each image run alone, and the packed stream padded with empty-interval tokens, give the same features."""
  patches, pos, start, end = _vit_inputs(cases)
  f = jax.jit(lambda m, *a: m(*a))
  cu = cases["vit/cu_seqlens"]
  for i in range(len(cu) - 1):
    a, b = int(cu[i]), int(cu[i + 1])
    alone = f(parts.vit, patches[:, a:b], pos[:, a:b], start[:, a:b] - a, end[:, a:b] - a)
    assert rel_err(alone[0], outputs["vit/features"][a:b]) < 1e-6
  pad = 5
  padded = f(parts.vit, jnp.pad(patches, ((0, 0), (0, pad), (0, 0)), constant_values=3.0),
             jnp.pad(pos, ((0, 0), (0, pad))), jnp.pad(start, ((0, 0), (0, pad))), jnp.pad(end, ((0, 0), (0, pad))))
  assert rel_err(padded[0, :-pad], outputs["vit/features"]) < 1e-6
  assert np.isfinite(np.asarray(padded)).all()


def test_xla_chunked_matches_reference(cfg, ema, cases, outputs):
  p = Parts(cfg, rngs=nnx.Rngs(1), attention_impl="xla_chunked")
  load_parts(p, cfg, ema)
  feats = jax.jit(lambda m, *a: m(*a))(p.vit, *_vit_inputs(cases))
  assert rel_err(feats[0], outputs["vit/features"]) < 1e-6


def test_layers_are_stacked_and_distinct(cfg):
  vit = SiglipVisionModel(cfg.vit, 8, rngs=nnx.Rngs(0))
  k = np.asarray(vit.layers.q_proj.kernel[...])
  assert k.shape == (cfg.vit.num_hidden_layers, cfg.vit.hidden_size, cfg.vit.hidden_size)
  assert not np.allclose(k[0], k[1])


# ----------------------------------------------------------------------------- weights table
def _read_manifest():
  rows = {}
  for line in MANIFEST.read_text().splitlines():
    if not line.strip() or line.startswith("#"):
      continue
    key, shape, _ = line.split("\t")[:3]
    rows[key] = tuple(int(s) for s in shape.split("x"))
  return rows


def _check_rules(cfg, abstract_bagel, upstream_shapes):
  abstract = {"bagel": abstract_bagel}
  table = list(weights._vit_rules(cfg))
  counts = collections.Counter(r.upstream for r in table)
  assert all(c == 1 for c in counts.values())
  assert set(counts) == {k for k in upstream_shapes if k.startswith(PREFIXES)}
  cover = {}
  for r in table:
    assert weights.expected_upstream_shape(r, abstract) == upstream_shapes[r.upstream], r.upstream
    leaf = weights._get(abstract, r.path)
    cov = cover.setdefault(r.path, np.zeros(tuple(leaf.shape)[:len(r.index)] or (1,), np.int32))
    cov[r.index if r.index else 0] += 1
  for path in weights._paths(abstract):
    assert path in cover, f"parameter {path} has no upstream tensor"
    assert (cover[path] == 1).all(), f"parameter {path} covered {cover[path]} times"


def test_release_manifest_maps_one_to_one():
  cfg = bagel_7b_mot()
  assert cfg.vit == ViTConfig() and cfg.vit_max_num_patch_per_side == 70 and cfg.llm.hidden_size == 3584
  parts = nnx.eval_shape(lambda: Parts(cfg, rngs=nnx.Rngs(0)))
  abstract = nnx.to_pure_dict(nnx.state(parts))
  manifest = _read_manifest()
  _check_rules(cfg, abstract, manifest)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["vit"]))
  assert n == 402_552_736  # dossier section 6.3


def test_fixture_keys_map_one_to_one(cfg):
  from safetensors import safe_open
  with safe_open(str(FIXTURE_DIR / "ema.safetensors"), framework="numpy") as f:
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  parts = nnx.eval_shape(lambda: Parts(cfg, rngs=nnx.Rngs(0)))
  _check_rules(cfg, nnx.to_pure_dict(nnx.state(parts)), shapes)
