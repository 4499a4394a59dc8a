"""The attention API: backend choice, refusal with a reason, interpret switches, decode, the bench."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.attention import BackendUnavailable, attention, choose_impl, pallas_gpu, pallas_tpu
from bagel_jax.attention import api, cudnn, reference
from bagel_jax.attention.mask import dense_mask
from tests.conftest import rel_err
from tests.test_attention_kernels import _inputs, batch_intervals, make_intervals

LAYOUT = [[(6, "causal"), (15, "full"), (11, "noise"), (3, "causal")], [(9, "causal"), (12, "noise")]]


def _case(t=75, hq=4, hkv=2, d=64, dtype=jnp.float32):
  ints = batch_intervals([LAYOUT, LAYOUT[::-1]], t)
  q, k, v, _ = _inputs(1, 2, t, t, hq, hkv, d, dtype)
  return q, k, v, ints


def test_auto_on_cpu_runs_an_xla_backend_it_logs(caplog, monkeypatch):
  """impl='auto' on CPU: the backend that actually runs is the one `choose_impl` names and the log
  reports, an XLA one (no kernel that cannot run here), below and above the dense size limit; its
  output is the reference's."""
  ran = []
  load = api.load
  monkeypatch.setattr(api, "load", lambda impl: ran.append(impl) or load(impl))
  for t, d in ((75, 64), (1030, 16)):  # 75^2 and 1030^2 > 2^20 logits per head
    q, k, v, ints = _case(t=t, hq=2, hkv=1, d=d)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="bagel_jax.attention.api"):
      out = jax.jit(lambda q, k, v: attention(q, k, v, *ints))(q, k, v)
    want = choose_impl("cpu", t, t)
    assert ran[-1] == want and f"chose {want} for T={t}" in caplog.text, (ran, caplog.text)
    assert want not in ("pallas_gpu", "pallas_tpu", "cudnn")
    ref = reference.reference_attention(q, k, v, *ints, scale=d**-0.5)
    assert rel_err(out, ref) < 1e-5, (t, want)
  assert choose_impl("cpu", 4096, 4096) == "xla_blocksparse"
  assert choose_impl("cpu", 64, 64) == "reference"


def test_auto_does_not_pick_a_kernel_that_cannot_run(caplog):
  # On this CPU-only machine a "gpu"/"tpu" platform name must not yield a Pallas backend.
  with caplog.at_level(logging.DEBUG, logger="bagel_jax.attention.api"):
    assert choose_impl("gpu", 64, 64) == "reference"
    assert choose_impl("tpu", 8192, 8192) == "xla_chunked"
  assert "pallas_gpu cannot run" in caplog.text and "pallas_tpu cannot run" in caplog.text


@pytest.mark.parametrize("impl,words", [("pallas_gpu", "GPU"), ("pallas_tpu", "TPU"), ("cudnn", "GPU")])
def test_named_backend_that_cannot_run_raises_with_reason(impl, words):
  q, k, v, ints = _case(dtype=jnp.bfloat16)
  with pytest.raises(BackendUnavailable, match=words):
    attention(q, k, v, *ints, impl=impl)


def test_cudnn_dense_mask_math_matches_reference():
  """The cudnn backend's own computation (padding to 64, dense mask from the intervals, masked
  softmax, empty rows zeroed) with XLA's implementation in float32: equal to the reference, forward
  and gradients, on a layout with padding, an empty row and a query chunk against a longer cache."""
  q, k, v, ints = _case(t=75, d=32)
  ks, ke, qs, qe = (np.asarray(x).copy() for x in ints)
  ke[1, 5] = ks[1, 5]  # row 5 of sample 1 sees nothing
  ints = tuple(jnp.asarray(x) for x in (ks, ke, qs, qe))
  do = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
  dense = functools.partial(cudnn.dense_mask_attention, implementation="xla")

  def run(f):
    def loss(q, k, v):
      o = f(q, k, v, *ints, scale=0.2)
      return jnp.sum(o * do), o
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  (_, out), grads = run(dense)
  (_, ref), ref_grads = run(reference.reference_attention)
  assert rel_err(out, ref) < 1e-5
  for a, b in zip(grads, ref_grads):
    assert rel_err(a, b) < 1e-5
  assert np.all(np.asarray(out)[1, 5] == 0) and np.all(np.asarray(out)[:, 56:] == 0)  # empty row, padding
  from tests.test_attention_kernels import _cache_case
  q, k, v, ints, qp = _cache_case(seed=5, d=32)
  out = jax.jit(lambda q, k, v: dense(q, k, v, *ints, qp, scale=0.2))(q, k, v)
  assert rel_err(out, reference.reference_attention(q, k, v, *ints, qp, scale=0.2)) < 1e-5


# Where each backend's numbers are checked against `reference` (a new backend needs an entry).
NUMERIC_TESTS = {
    "reference": [("tests.test_bagel_parity", "test_hidden_states")],  # against upstream's recorded outputs
    "xla_chunked": [("tests.test_attention_api", "test_xla_chunked_matches_reference_on_padded_layout")],
    "xla_blocksparse": [("tests.test_attention_blocksparse", "test_matches_reference_on_random_layouts")],
    "flash_xla": [("tests.test_sharding", "test_flash_xla_stand_in_matches_reference")],
    "pallas_gpu": [("tests.test_attention_kernels", "test_matches_reference_on_random_layouts"),
                   ("tests.test_attention_api", "test_module_interpret_switch_through_the_api")],
    "pallas_tpu": [("tests.test_attention_kernels", "test_matches_reference_on_random_layouts"),
                   ("tests.test_attention_api", "test_force_tpu_interpret_mode_context")],
    "cudnn": [("tests.test_attention_api", "test_cudnn_dense_mask_math_matches_reference"),
              ("tests.test_attention_api", "test_cudnn_on_gpu_matches_reference")],
    "decode": [("tests.test_attention_api", "test_decode_impl_through_the_api"),
               ("tests.test_attention_kernels", "test_decode_matches_reference")],
}


def test_every_backend_has_a_numeric_test():
  import importlib

  from bagel_jax.attention.registry import BACKENDS
  assert set(NUMERIC_TESTS) == set(BACKENDS)
  for impl, tests in NUMERIC_TESTS.items():
    for module, name in tests:
      assert callable(getattr(importlib.import_module(module), name, None)), (impl, module, name)


@pytest.mark.gpu  # deselected by default (pyproject addopts); launch/device_check.sh runs `pytest -m gpu`
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cudnn_on_gpu_matches_reference(dtype):
  """cuDNN's fused attention through the API (bf16/fp16) against the float32 reference: forward and
  gradients, packed BAGEL layouts with padding and GQA; the tolerance of the kernels' bf16 tests."""
  q, k, v, ints = _case(t=300, hq=28, hkv=4, d=128, dtype=dtype)
  do = jax.random.normal(jax.random.key(9), q.shape, jnp.float32).astype(dtype)
  f32 = lambda x: x.astype(jnp.float32)

  def run(impl, q, k, v, do):
    loss = lambda q, k, v: jnp.sum(f32(attention(q, k, v, *ints, impl=impl)) * f32(do))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  got = run("cudnn", q, k, v, do)
  want = run("reference", f32(q), f32(k), f32(v), f32(do))
  for name, a, b in zip(("dq", "dk", "dv"), got[1], want[1]):
    assert a.dtype == dtype and rel_err(f32(a), b) < 2e-2, name
  out = jax.jit(lambda q, k, v: attention(q, k, v, *ints, impl="cudnn"))(q, k, v)
  ref = reference.reference_attention(f32(q), f32(k), f32(v), *ints, scale=128**-0.5)
  assert out.dtype == dtype and rel_err(f32(out), ref) < 2e-2


def test_unknown_impl_and_bad_shapes():
  q, k, v, ints = _case()
  with pytest.raises(ValueError, match="unknown attention impl"):
    attention(q, k, v, *ints, impl="flash")
  with pytest.raises(ValueError, match="not a multiple"):
    attention(q[:, :, :3], k, v, *ints)
  with pytest.raises(ValueError, match="k_start"):
    attention(q, k, v, ints[0][:, :5], *ints[1:])


@pytest.mark.parametrize("mod,bs", [(pallas_gpu, pallas_gpu.BlockSizes(32, 16, 16, 32)),
                                    (pallas_tpu, pallas_tpu.BlockSizes(16, 32, 32, 16))])
def test_module_interpret_switch_through_the_api(monkeypatch, mod, bs):
  """`INTERPRET = True` makes impl='pallas_*' run on CPU through the public API (and is undone)."""
  monkeypatch.setattr(mod, "INTERPRET", True)
  monkeypatch.setattr(mod, "default_block_sizes", lambda dtype: bs)  # small tiles: several blocks
  q, k, v, ints = _case()
  out = jax.jit(lambda q, k, v: attention(q, k, v, *ints, impl=mod.__name__.rsplit(".", 1)[1]))(q, k, v)
  ref = reference.reference_attention(q, k, v, *ints, scale=64**-0.5)
  assert rel_err(out, ref) < 1e-5


def test_force_tpu_interpret_mode_context():
  from jax.experimental.pallas import tpu as pltpu

  t = 24
  ints = tuple(jnp.asarray(x)[None] for x in make_intervals([[(7, "causal"), (9, "noise"), (5, "causal")]], t))
  q, k, v, _ = _inputs(2, 1, t, t, 2, 1, 32, jnp.float32)
  with pltpu.force_tpu_interpret_mode():
    out = jax.jit(lambda q, k, v: pallas_tpu.attention(q, k, v, *ints, scale=0.2,
                                                       block_sizes=pallas_tpu.BlockSizes(32, 32, 32, 32)))(q, k, v)
  ref = reference.reference_attention(q, k, v, *ints, scale=0.2)
  assert rel_err(out, ref) < 1e-5


def test_decode_impl_through_the_api():
  from tests.test_attention_kernels import _cache_case

  q, k, v, ints, qp = _cache_case(seed=4)
  out = attention(q, k, v, *ints, qp, impl="decode")
  ref = reference.reference_attention(q, k, v, *ints, qp, scale=q.shape[-1]**-0.5)
  assert rel_err(out, ref) < 1e-5


def test_xla_chunked_matches_reference_on_padded_layout():
  q, k, v, ints = _case(t=75)
  f = lambda impl: attention(q, k, v, *ints, impl=impl)
  assert rel_err(f("xla_chunked"), f("reference")) < 1e-5


# ----------------------------------------------------------------------------- the benchmark

def test_bench_layouts_follow_the_design():
  from bagel_jax.bench import attention as bench

  samples = bench.bagel_layout(4096, seed=1)
  assert len(samples) >= 2
  n = 4096
  got = bench.intervals(samples, n)
  want = make_intervals(samples, n)  # the tests' own builder
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  ks, ke, qs, qe = got
  small = [s[:2] for s in samples[:3]]
  total = sum(l for s in small for l, _ in s) + 3
  sk = bench.intervals(small, total)
  dense = np.asarray(dense_mask(*[jnp.asarray(x)[None] for x in sk]))[0]
  assert bench.visible_pairs(*sk, rows=7) == int(dense.sum())


def test_bench_cli_prints_a_table(capsys):
  from bagel_jax.bench.__main__ import main

  assert main(["attention", "--sizes", "160", "--impls", "reference,xla_chunked", "--heads", "2", "--kv-heads", "1",
               "--head-dim", "16", "--reps", "1", "--no-backward"]) == 0
  out = capsys.readouterr().out
  assert "| tokens |" in out and "| 160 |" in out and "xla_chunked" in out
  assert main([]) == 2 and "attention" in capsys.readouterr().out
