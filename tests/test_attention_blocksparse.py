"""The CPU block-sparse backend (`xla_blocksparse`) against `reference`: outputs and gradients.

Random BAGEL layouts (packed causal / full / noise blocks, lengths that are not multiples of the
block, padding), rows that see nothing, a query chunk against a KV cache (prefill), and the
number of loop iterations (visited blocks) on a packed row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from bagel_jax.attention import attention, blocks, choose_impl, reference, xla_blocksparse
from tests.test_attention_kernels import (HYP, _inputs, _loss_and_grads, batch_intervals, layout_st,
                                          make_intervals)

BS = 16  # small blocks: several per sample at T = 75, so skipping is exercised


@functools.lru_cache(maxsize=None)
def _runner(kind: str, scale: float):
  fn = (functools.partial(xla_blocksparse.attention, block_q=BS, block_k=BS) if kind == "sparse"
        else reference.reference_attention)
  return jax.jit(lambda q, k, v, ints, qp, do: _loss_and_grads(fn, q, k, v, ints, qp, do, scale))


def _check(ints, qp=None, hq=4, hkv=2, d=32, seed=0, s=None):
  b, t = ints[0].shape
  s = ints[2].shape[1] if s is None else s
  q, k, v, do = _inputs(seed, b, t, s, hq, hkv, d, jnp.float32)
  o, g = _runner("sparse", d**-0.5)(q, k, v, ints, qp, do)
  o_ref, g_ref = _runner("reference", d**-0.5)(q, k, v, ints, qp, do)
  for name, ours, ref in [("out", o, o_ref)] + list(zip(("dq", "dk", "dv"), g, g_ref)):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(ours)), name
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=2e-5, err_msg=name)
  return o, g


@HYP
@given(layouts=st.lists(layout_st, min_size=2, max_size=2), seed=st.integers(0, 2**16))
def test_matches_reference_on_random_layouts(layouts, seed):
  _check(batch_intervals(layouts, 75), seed=seed)


def test_rows_that_see_nothing_give_zeros():
  ks, ke, qs, qe = make_intervals([[(12, "causal"), (10, "noise")], [(48, "full")]], 75)
  ke[5] = ks[5]  # row 5 sees nothing; rows 70.. are padding
  pad = np.zeros(75, np.int32)
  ints = tuple(jnp.asarray(np.stack([pad, x])) for x in (ks, ke, qs, qe))
  o, g = _check(ints)
  assert np.all(np.asarray(o)[0] == 0) and np.all(np.asarray(o)[1, 5] == 0) and np.all(np.asarray(o)[1, 70:] == 0)
  assert np.all(np.asarray(g[0])[1, 5] == 0) and np.all(np.asarray(g[1])[1, 70:] == 0)


def test_query_chunk_against_cache():
  """Prefill: 13 queries at absolute positions 50.. against a cache of 50 slots plus themselves."""
  cap, t = 50, 13
  ks, ke, qs, qe, qp = [], [], [], [], []
  for n in (0, 31):
    c_ks, c_ke, c_qs, c_qe = make_intervals([[(4, "causal"), (6, "full"), (3, "causal")]], t)
    ks.append(np.zeros(t, np.int32))
    ke.append(cap + c_ke)
    qs.append(np.concatenate([np.zeros(cap, np.int32), cap + c_qs]))
    qe.append(np.concatenate([np.where(np.arange(cap) < n, cap + t, 0), cap + c_qe]).astype(np.int32))
    qp.append(cap + np.arange(t, dtype=np.int32))
  ints = tuple(jnp.asarray(np.stack(x)) for x in (ks, ke, qs, qe))
  _check(ints, qp=jnp.asarray(np.stack(qp)), seed=3)


def test_skips_cross_sample_and_masked_blocks():
  # four samples of 64 tokens (text, then a noisy latent block, then text): with 16-blocks only
  # the blocks inside a sample are visited, and later text does not visit the noisy block.
  sample = [(16, "causal"), (32, "noise"), (16, "causal")]
  ks, ke, qs, qe = make_intervals([sample] * 4, 256)
  p = blocks.pad_intervals(*(jnp.asarray(x)[None] for x in (ks, ke, qs, qe)), None, 256, 256)
  count = int(xla_blocksparse._visits(p, BS, BS)[0])
  # per sample (4 blocks: T, N, N, T): T0 sees itself; N sees T0 and N N; last T sees T0 and itself
  assert count == 4 * (1 + 2 * 3 + 2)
  assert int(jnp.sum(blocks.intersecting_blocks(*(jnp.asarray(x)[None] for x in (ks, ke, qs, qe)),
                                                block_q=BS, block_k=BS))) == count


def test_auto_picks_it_on_cpu_only():
  assert choose_impl("cpu", 738, 738) == "xla_blocksparse"
  q, k, v, do = _inputs(0, 1, 40, 40, 4, 2, 32, jnp.float32)
  ints = tuple(jnp.asarray(x)[None] for x in make_intervals([[(10, "causal"), (30, "full")]], 40))
  np.testing.assert_allclose(attention(q, k, v, *ints, impl="xla_blocksparse"),
                             reference.reference_attention(q, k, v, *ints, scale=32**-0.5), rtol=1e-5, atol=1e-6)
