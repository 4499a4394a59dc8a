"""Pallas kernels (GPU/Triton and TPU/Mosaic, run in interpret mode on CPU) against `reference`.

Property tests draw random BAGEL layouts: packed samples made of text (causal), ViT (full),
clean VAE (full) and noisy VAE (noise) blocks, lengths that are not multiples of the block size,
padding at the end.  Shapes are fixed per configuration, so each kernel compiles once and the
examples only change the data.
"""

from __future__ import annotations

import functools
import re

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from bagel_jax.attention import blocks, decode, pallas_gpu, pallas_tpu, reference
from bagel_jax.attention.mask import dense_mask
from tests.conftest import rel_err

MODES = ("causal", "full", "noise")  # text / ViT or clean VAE / noisy VAE
HYP = settings(max_examples=5, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- layouts

def make_intervals(samples, total: int):
  """samples: list of samples, each a list of (length, mode); packed from position 0, the rest of
  `total` is padding.  Returns k_start, k_end, q_start, q_end as int32 [total] (DESIGN.md)."""
  ks, ke, qs, qe = (np.zeros(total, np.int32) for _ in range(4))
  pos = 0
  for splits in samples:
    s0 = pos
    s1 = pos + sum(n for n, _ in splits)
    assert s1 <= total
    for n, mode in splits:
      b0, b1 = pos, pos + n
      for q in range(b0, b1):
        ks[q] = s0
        ke[q] = q + 1 if mode == "causal" else b1
        qs[q] = q if mode == "causal" else b0
        qe[q] = b1 if mode == "noise" else s1
      pos = b1
  # padding rows and columns: k_end = k_start, q_end = q_start (zeros here)
  return ks, ke, qs, qe


def _fit(samples, total):
  """Drop splits that do not fit into `total` tokens."""
  out, used = [], 0
  for splits in samples:
    kept = []
    for n, mode in splits:
      if used + n > total:
        break
      kept.append((n, mode))
      used += n
    if kept:
      out.append(kept)
    if used >= total:
      break
  return out


split_st = st.tuples(st.integers(1, 23), st.sampled_from(MODES))
sample_st = st.lists(split_st, min_size=1, max_size=4)
layout_st = st.lists(sample_st, min_size=1, max_size=5)


def batch_intervals(layouts, total):
  arrs = [make_intervals(_fit(l, total), total) for l in layouts]
  return tuple(jnp.asarray(np.stack([a[i] for a in arrs])) for i in range(4))


# ----------------------------------------------------------------------------- runners

def _loss_and_grads(fn, q, k, v, ints, qp, do, scale):
  def loss(q, k, v):
    o = fn(q, k, v, *ints, qp, scale=scale)
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o
  (_, o), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return o, g


@functools.lru_cache(maxsize=None)
def _runner(kind: str, bs: tuple, scale: float):
  if kind == "gpu":
    fn = functools.partial(pallas_gpu.attention, block_sizes=pallas_gpu.BlockSizes(*bs), interpret=True)
  elif kind == "tpu":
    fn = functools.partial(pallas_tpu.attention, block_sizes=pallas_tpu.BlockSizes(*bs), interpret=True)
  else:
    fn = reference.reference_attention
  return jax.jit(lambda q, k, v, ints, qp, do: _loss_and_grads(fn, q, k, v, ints, qp, do, scale))


def _inputs(seed, b, t, s, hq, hkv, d, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, t, hq, d), jnp.float32).astype(dtype)
  return q, k, v, do


def check_against_reference(kind, bs, dtype, d, hq, hkv, ints, qp=None, seed=0, s=None):
  b, t = ints[0].shape
  s = ints[2].shape[1] if s is None else s
  q, k, v, do = _inputs(seed, b, t, s, hq, hkv, d, dtype)
  scale = d**-0.5
  o, g = _runner(kind, bs, scale)(q, k, v, ints, qp, do)
  f32 = lambda x: x.astype(jnp.float32)
  o_ref, g_ref = _runner("reference", (), scale)(f32(q), f32(k), f32(v), ints, qp, f32(do))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for name, ours, ref in [("out", o, o_ref)] + list(zip(("dq", "dk", "dv"), g, g_ref)):
    assert ours.dtype == dtype, (name, ours.dtype)
    assert np.all(np.isfinite(np.asarray(ours, np.float32))), name
    # relative error; the floor (an RMS of 0.05, where inputs have unit scale) only matters for
    # gradients that vanish in exact arithmetic (a row whose only visible key is itself has dq = 0,
    # computed as p * (dp - delta) with rounding noise in both terms).
    diff = np.asarray(ours, np.float64) - np.asarray(ref, np.float64)
    err = np.linalg.norm(diff) / max(np.linalg.norm(np.asarray(ref, np.float64)), 0.05 * np.sqrt(diff.size))
    assert err <= tol, f"{kind} {name}: relative error {err:.3g} > {tol}"
  # rows that see nothing give exactly zero, and so do their dq rows
  empty = ~np.asarray(dense_mask(*ints, qp)).any(-1)  # [B, T]
  assert np.all(np.asarray(o, np.float32)[empty] == 0)
  assert np.all(np.asarray(g[0], np.float32)[empty] == 0)
  return empty


# (kind, block sizes, dtype, head dim, Hq, Hkv, T): T is never a multiple of the blocks.  Each
# configuration compiles once; the other tests reuse these shapes where they can.
GPU_BS, TPU_BS = (32, 16, 16, 32), (16, 32, 32, 16)
CONFIGS = [
    ("gpu", GPU_BS, jnp.float32, 64, 4, 2, 75),
    ("gpu", (16, 32, 32, 16), jnp.bfloat16, 72, 4, 1, 75),
    ("tpu", TPU_BS, jnp.float32, 64, 4, 2, 75),
    ("tpu", (32, 16, 16, 16), jnp.bfloat16, 128, 4, 2, 75),
]


@pytest.mark.parametrize("kind,bs,dtype,d,hq,hkv,t", CONFIGS,
                         ids=[f"{c[0]}-{jnp.dtype(c[2]).name}-d{c[3]}-g{c[4] // c[5]}" for c in CONFIGS])
@HYP
@given(layouts=st.lists(layout_st, min_size=2, max_size=2), seed=st.integers(0, 2**16))
def test_matches_reference_on_random_layouts(kind, bs, dtype, d, hq, hkv, t, layouts, seed):
  ints = batch_intervals(layouts, t)
  check_against_reference(kind, bs, dtype, d, hq, hkv, ints, seed=seed)


# Head dims 64, 72 and 128 for both kernels: the configurations above cover four of the six
# (kernel, head dim) pairs; these two add the rest, in fp32.
@pytest.mark.parametrize("kind,bs,d", [("gpu", GPU_BS, 128), ("tpu", TPU_BS, 72)])
def test_head_dims_fp32(kind, bs, d):
  layout = [[(9, "causal"), (20, "full"), (13, "noise"), (5, "causal")], [(11, "causal"), (17, "noise")]]
  ints = batch_intervals([layout, layout[::-1]], 75)
  check_against_reference(kind, bs, jnp.float32, d, 4, 2, ints, seed=d)


def test_empty_rows_and_columns_give_zeros_without_nan():
  # sample 0 is padding only; in sample 1 one query sees nothing although its key is visible
  t = 75  # shapes and blocks as in other tests, so the compiled kernels are reused
  # the 48-token ViT block also gives fully visible blocks, where the kernels skip the mask
  ks, ke, qs, qe = make_intervals([[(12, "causal"), (10, "noise")], [(48, "full")]], t)
  ke[5] = ks[5]  # row 5 sees nothing
  pad = np.zeros(t, np.int32)
  ints = tuple(jnp.asarray(np.stack([pad, x])) for x in (ks, ke, qs, qe))
  for kind, bs in (("gpu", GPU_BS), ("tpu", TPU_BS)):
    for bq, bk in (bs[:2], bs[2:]):
      p = blocks.pad_intervals(*ints, None, blocks.cdiv(t, bq) * bq, blocks.cdiv(t, bk) * bk)
      assert int(blocks.full_mask(p, bq, bk).sum()) >= 2
    empty = check_against_reference(kind, bs, jnp.float32, 64, 4, 2, ints)
    assert empty[0].all() and empty[1, 5] and empty[1, 70:].all() and not empty[1, :5].any()


@pytest.mark.parametrize("kind", ["gpu", "tpu"])
def test_query_chunk_against_cache(kind):
  """T != S, absolute q_positions: a chunk of 13 queries after a cache of 50 slots (KV-cache use)."""
  cap, t = 50, 13
  lengths = np.array([0, 31])
  slot = np.arange(cap)
  big = cap + t
  ks, ke, qs, qe, qp = [], [], [], [], []
  for n in lengths:
    c_ks, c_ke, c_qs, c_qe = make_intervals([[(4, "causal"), (6, "full"), (3, "causal")]], t)
    ks.append(np.zeros(t, np.int32))
    ke.append(cap + c_ke)
    qs.append(np.concatenate([np.zeros(cap, np.int32), cap + c_qs]))
    qe.append(np.concatenate([np.where(slot < n, big, 0), cap + c_qe]).astype(np.int32))
    qp.append(cap + np.arange(t, dtype=np.int32))
  ints = tuple(jnp.asarray(np.stack(x)) for x in (ks, ke, qs, qe))
  bs = (16, 16, 16, 16)
  check_against_reference(kind, bs, jnp.float32, 64, 4, 2, ints, qp=jnp.asarray(np.stack(qp)), seed=3)


# ----------------------------------------------------------------------------- block skipping

EIGHT_SAMPLES = [
    [(5, "causal"), (9, "noise")],
    [(3, "causal"), (8, "full"), (6, "causal")],
    [(12, "causal")],
    [(4, "causal"), (7, "full"), (7, "full"), (2, "causal"), (9, "noise")],
    [(10, "full"), (5, "causal")],
    [(6, "causal"), (11, "noise")],
    [(9, "causal")],
    [(3, "causal"), (6, "full"), (4, "causal")],
]


def test_visited_blocks_equal_intersecting_blocks_for_eight_samples():
  t = sum(n for s in EIGHT_SAMPLES for n, _ in s) + 5  # 157 tokens, 5 of padding
  ints = tuple(jnp.asarray(x)[None] for x in make_intervals(EIGHT_SAMPLES, t))
  bq = bk = 16
  q, k, v, _ = _inputs(0, 1, t, t, 2, 1, 16, jnp.float32)
  visits = pallas_gpu.visit_counts(q, k, v, *ints, scale=0.25, interpret=True,
                                   block_sizes=pallas_gpu.BlockSizes(bq, bk, bq, bk))
  oracle = blocks.intersecting_blocks(*ints, block_q=bq, block_k=bk)  # from the dense mask
  nq, nk = blocks.cdiv(t, bq), blocks.cdiv(t, bk)
  # the kernel's in-loop counter, per query block, equals the oracle's count for every head
  np.testing.assert_array_equal(np.asarray(visits[0, 0]), np.asarray(oracle[0].sum(-1)))
  np.testing.assert_array_equal(np.asarray(visits[0, 1]), np.asarray(oracle[0].sum(-1)))
  total = int(visits[0, 0].sum())
  assert total == int(oracle.sum())
  assert total < nq * nk / 3, (total, nq * nk)  # far from the full grid
  # and the schedule lists exactly the intersecting blocks, in both directions
  for by, m in (("query", oracle), ("key", jnp.swapaxes(oracle, 1, 2))):
    sched = np.asarray(blocks.visit_schedule(*ints, block_q=bq, block_k=bk, by=by))[0]
    for i in range(m.shape[1]):
      n = sched[i, 0]
      assert list(sched[i, 1:1 + n]) == list(np.nonzero(np.asarray(m[0, i]))[0])


@HYP
@given(layout=layout_st, bq=st.sampled_from([8, 16, 32]), bk=st.sampled_from([8, 16, 32]))
def test_schedule_is_exact_on_random_layouts(layout, bq, bk):
  t = 93
  ints = tuple(jnp.asarray(x)[None] for x in make_intervals(_fit(layout, t), t))
  p = blocks.pad_intervals(*ints, None, blocks.cdiv(t, bq) * bq, blocks.cdiv(t, bk) * bk)
  ours = np.asarray(blocks.block_mask(p, bq, bk))
  oracle = np.asarray(blocks.intersecting_blocks(*ints, block_q=bq, block_k=bk))
  assert not (oracle & ~ours).any(), "a visible block would be skipped"
  np.testing.assert_array_equal(ours, oracle)
  # blocks flagged fully visible (the kernels skip the mask there) are exactly the all-true ones
  tp, sp = p.tp, p.sp
  dense = np.zeros((tp, sp), bool)
  dense[:t, :t] = np.asarray(dense_mask(*ints))[0]
  all_true = dense.reshape(tp // bq, bq, sp // bk, bk).all(axis=(1, 3))
  np.testing.assert_array_equal(np.asarray(blocks.full_mask(p, bq, bk))[0], all_true)


# ----------------------------------------------------------------------------- decode

def _cache_case(seed=0, t=5, cap=70, hq=4, hkv=2, d=32):
  lengths = np.array([0, 23, 66])
  b = len(lengths)
  slot = np.arange(cap)
  big = cap + t
  n_valid = np.array([t - 1, t, t])  # the last row of sample 0 is padding
  rows = np.arange(t)
  valid = rows[None] < n_valid[:, None]
  pos = cap + rows
  ks = np.zeros((b, t), np.int32)
  ke = np.where(valid, pos + 1, 0).astype(np.int32)
  qs = np.concatenate([np.zeros((b, cap), np.int32), np.broadcast_to(pos, (b, t))], 1).astype(np.int32)
  qe = np.concatenate([np.where(slot[None] < lengths[:, None], big, 0), np.where(valid, big, 0)], 1)
  qp = np.broadcast_to(pos, (b, t)).astype(np.int32)
  q, k, v, _ = _inputs(seed, b, t, cap + t, hq, hkv, d, jnp.float32)
  ints = tuple(jnp.asarray(x, jnp.int32) for x in (ks, ke, qs, qe))
  return q, k, v, ints, jnp.asarray(qp)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_decode_matches_reference(impl):
  q, k, v, ints, qp = _cache_case()
  ref = reference.reference_attention(q, k, v, *ints, qp, scale=0.2)
  out = jax.jit(lambda q, k, v: decode.attention(q, k, v, *ints, qp, scale=0.2, impl=impl, chunk_size=16,
                                                 num_splits=3, interpret=True))(q, k, v)
  assert rel_err(out, ref) <= 1e-5
  assert np.all(np.asarray(out[0, -1]) == 0)  # padding row


# ----------------------------------------------------------------------------- lowering (no device)

def test_kernels_lower_for_cuda_and_tpu(monkeypatch):
  """Trace + lower fwd and bwd for real targets on CPU (Triton IR, Mosaic IR): catches lowering
  errors the interpreter cannot see.  Uses private hooks to name a device (a jax upgrade that moves them
  fails here, on purpose: the lowering must stay checked)."""
  import contextlib

  from jax._src.mesh import AbstractDevice
  from jax._src.pallas.triton import gpu_info as gi
  from jax._src.pallas.triton import pallas_call_registration as reg
  monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: gi.get_gpu_info_from_version(gi.GpuVersion.A100))
  monkeypatch.setattr(pallas_gpu, "unavailable_reason", lambda: None)
  monkeypatch.setattr(pallas_tpu, "unavailable_reason", lambda: None)
  t = 300
  ints = tuple(jnp.asarray(x)[None] for x in make_intervals([[(40, "causal"), (200, "noise"), (30, "causal")]], t))
  q = jax.ShapeDtypeStruct((1, t, 28, 72), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, t, 4, 72), jnp.bfloat16)
  tpu_mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
      device_kind="TPU v5p", num_cores=1, platform="tpu"))
  for mod, platform, target, ctx in ((pallas_gpu, "cuda", "__gpu$xla.gpu.triton", contextlib.nullcontext()),
                                     (pallas_tpu, "tpu", "tpu_custom_call", jax.sharding.use_abstract_mesh(tpu_mesh))):
    loss = lambda q, k, v, mod=mod: jnp.sum(mod.attention(q, k, v, *ints, scale=0.1, interpret=False)
                                            .astype(jnp.float32))
    with ctx:
      text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
          lowering_platforms=(platform,)).as_text()
    # Exactly our three kernels (forward, dq, dkv), each as the platform's kernel custom call.
    calls = [ln for ln in text.splitlines() if f"custom_call @{target}(" in ln]
    names = sorted(n for ln in calls for n in set(re.findall(r"bagel_interval_attention_\w+", ln)))
    assert names == ["bagel_interval_attention_dkv", "bagel_interval_attention_dq", "bagel_interval_attention_fwd"], (
        platform, names, len(calls))
