"""The attention API: backend choice, refusal with a reason, interpret switches, decode, the bench."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.attention import BackendUnavailable, attention, choose_impl, pallas_gpu, pallas_tpu
from bagel_jax.attention import reference
from bagel_jax.attention.mask import dense_mask
from tests.conftest import rel_err
from tests.test_attention_kernels import _inputs, batch_intervals, make_intervals

LAYOUT = [[(6, "causal"), (15, "full"), (11, "noise"), (3, "causal")], [(9, "causal"), (12, "noise")]]


def _case(t=75, hq=4, hkv=2, d=64, dtype=jnp.float32):
  ints = batch_intervals([LAYOUT, LAYOUT[::-1]], t)
  q, k, v, _ = _inputs(1, 2, t, t, hq, hkv, d, dtype)
  return q, k, v, ints


def test_auto_on_cpu_picks_xla_and_logs(caplog):
  q, k, v, ints = _case()
  with caplog.at_level(logging.DEBUG, logger="bagel_jax.attention.api"):
    out = attention(q, k, v, *ints)
  assert "chose reference" in caplog.text
  ref = reference.reference_attention(q, k, v, *ints, scale=64**-0.5)
  assert rel_err(out, ref) < 1e-6
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
