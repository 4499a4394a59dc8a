"""Packing rules of layout.py beyond the fixture: several samples, padding, CFG dropout, capacities."""

import numpy as np
import pytest

from bagel_jax import layout as L
from bagel_jax.config import bagel_tiny

TOK = bagel_tiny().tokens
KW = dict(max_patches_per_side=8, max_latent_size=8)


def _upstream_dense_mask(samples):
  """Upstream's rule, written independently. samples: per sample a list of (length, mode)."""
  blocks = []
  for splits in samples:
    n = sum(ln for ln, _ in splits)
    m = np.zeros((n, n), bool)
    start = 0
    for ln, mode in splits:
      end = start + ln
      m[start:end, :start] = True
      m[start:end, start:end] = np.tril(np.ones((ln, ln), bool)) if mode == "causal" else True
      start = end
    start = 0
    for ln, mode in splits:  # a noise split is hidden from every row outside it
      end = start + ln
      if mode == "noise":
        m[:start, start:end] = False
        m[end:, start:end] = False
      start = end
    blocks.append(m)
  total = sum(b.shape[0] for b in blocks)
  out, pos = np.zeros((total, total), bool), 0
  for b in blocks:
    out[pos:pos + len(b), pos:pos + len(b)] = b
    pos += len(b)
  return out


def test_two_samples_and_padding_match_upstream_rule():
  s0 = [L.Text([1, 2], loss=True), L.VaeImage((2, 2), loss=True), L.VaeImage((2, 2)), L.Text([3])]
  s1 = [L.VitImage((1, 3)), L.Text([4, 5, 6], loss=True)]
  lay = L.pack([[s0, s1]], L.Capacity(tokens=40), TOK, **KW)
  ref = _upstream_dense_mask([[(4, "causal"), (6, "noise"), (6, "full"), (3, "causal")],
                               [(5, "full"), (5, "causal")]])
  n = len(ref)
  mask = L.dense_mask_np(lay)
  np.testing.assert_array_equal(mask[:n, :n], ref)
  assert not mask[n:].any() and not mask[:, n:].any()  # padding sees nothing and is seen by nobody
  np.testing.assert_array_equal(lay.rope_ids[0, :n], [0, 1, 2, 3] + [4] * 6 + [4] * 6 + [5, 6, 7] + [0] * 5 + [1, 2, 3, 4, 5])
  np.testing.assert_array_equal(lay.sample_ids[0, :n], [0] * 19 + [1] * 10)
  assert (lay.sample_ids[0, n:] == -1).all()
  # experts: VAE latent tokens only are gen
  gen = np.asarray(lay.gen_indexes[0])
  np.testing.assert_array_equal(gen, [5, 6, 7, 8, 11, 12, 13, 14])
  assert len(lay.und_indexes[0]) == n - 8


def test_cfg_dropout_keeps_rope_advance_for_images():
  plan = [L.Text([1, 2], enable_cfg=True), L.VitImage((1, 2), enable_cfg=True), L.VaeImage((1, 1), loss=True)]
  dropped, kept = L.cfg_dropout(plan, np.random.default_rng(0), 1.0, 1.0, 1.0)
  assert kept == [False, False, True]
  assert isinstance(dropped[0], L.RopeSkip) and isinstance(dropped[1], L.VaeImage)
  lay = L.pack([[dropped]], L.Capacity(tokens=3), TOK, **KW)
  np.testing.assert_array_equal(lay.rope_ids[0], [1, 1, 1])  # the dropped ViT image still advanced the rope
  none_dropped, kept = L.cfg_dropout(plan, np.random.default_rng(0), 0.0, 0.0, 0.0)
  assert kept == [True, True, True] and list(none_dropped) == plan


def test_capacity_overflow_is_refused():
  with pytest.raises(L.LayoutError, match="Capacity.tokens=4"):
    L.pack([[[L.Text([1, 2, 3])]]], L.Capacity(tokens=4), TOK, **KW)
  with pytest.raises(L.LayoutError, match="Capacity.gen=3"):
    L.pack([[[L.VaeImage((2, 2), loss=True)]]], L.Capacity(tokens=16, gen=3), TOK, **KW)


def test_static_capacities_pad_index_sets():
  lay = L.pack([[[L.Text([1], loss=True)]], [[L.VaeImage((1, 2), loss=True)]]],
               L.Capacity(tokens=8, und=8, gen=4, vit=2, vae=4, ce=4, vae_images=2), TOK, **KW)
  assert lay.und_indexes.shape == (2, 8) and lay.gen_indexes.shape == (2, 4)
  np.testing.assert_array_equal(lay.ce_indexes[0], [0, 1, 8, 8])
  np.testing.assert_array_equal(lay.ce_labels[0, :2], [1, TOK.eos_token_id])
  np.testing.assert_array_equal(lay.ce_weights[0], [1, 1, 0, 0])
  np.testing.assert_array_equal(lay.vae_indexes[1], [1, 2, 8, 8])
  np.testing.assert_array_equal(lay.vae_image_ids[1], [0, 0, -1, -1])
  np.testing.assert_array_equal(lay.vae_image_grid[1, 0], [1, 2])


def test_ce_reweighting_follows_len2weight():
  lay = L.pack([[[L.Text([1, 2, 3], loss=True)]]], L.Capacity(tokens=5), TOK, reweight_ce=True, **KW)
  np.testing.assert_allclose(lay.ce_weights[0], [0.5] * 4)  # 1/sqrt(len([bos] + 3 ids))
