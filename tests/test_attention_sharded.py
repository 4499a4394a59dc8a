"""Kernels under a mesh (CPU, interpret mode): one call per shard, same numbers, target-aware choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from bagel_jax import sharding as shd
from bagel_jax.attention import attention, choose_impl, pallas_gpu, pallas_tpu, reference, sharded, target
from bagel_jax.attention.registry import why_not
from tests.conftest import rel_err
from tests.test_attention_kernels import _inputs, batch_intervals

LAYOUT = [[(6, "causal"), (15, "full"), (11, "noise"), (3, "causal")], [(9, "causal"), (12, "noise")]]


def _abstract_mesh(platform: str, kind: str) -> AbstractMesh:
  from jax._src.mesh import AbstractDevice  # the public AbstractMesh takes it; its class is not exported

  device = AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
  return AbstractMesh((1, 2, 2), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3, abstract_device=device)


def test_kernel_specs_follow_the_rules():
  mesh = shd.make_mesh("fsdp=4,tensor=2")
  q, kv, rows = sharded.kernel_specs(mesh, shd.DEFAULT_RULES, (8, 64, 28, 128), (8, 64, 4, 128))
  assert q == kv == P("fsdp", None, "tensor", None) and rows == P("fsdp", None)
  # 3 KV heads do not split over tensor=2: heads stay whole on every shard (query heads too)
  q, kv, _ = sharded.kernel_specs(mesh, shd.DEFAULT_RULES, (8, 64, 6, 128), (8, 64, 3, 128))
  assert q == kv == P("fsdp", None, None, None)
  rules = shd.rules_with({"activation_batch": "data,fsdp", "activation_heads": "", "activation_kv_heads": ""})
  q, _, _ = sharded.kernel_specs(mesh, rules, (8, 64, 28, 128), (8, 64, 4, 128))
  assert q == P("fsdp", None, None, None)


@pytest.mark.parametrize("module", [pallas_tpu, pallas_gpu])
def test_kernel_per_shard_matches_reference_with_grads(module, monkeypatch):
  monkeypatch.setattr(module, "INTERPRET", True)
  t, impl = 40, module.__name__.rsplit(".", 1)[1]
  ints = batch_intervals([LAYOUT, LAYOUT[::-1], LAYOUT, LAYOUT[::-1]], t)
  q, k, v, do = _inputs(3, 4, t, t, 4, 2, 64, jnp.float32)
  mesh = shd.make_mesh("fsdp=2,tensor=2", devices=jax.devices()[:4])

  def loss(fn, q, k, v):
    o = fn(q, k, v)
    return jnp.sum(o * do), o

  ours = lambda q, k, v: attention(q, k, v, *ints, impl=impl)
  ref = lambda q, k, v: reference.reference_attention(q, k, v, *ints, scale=64**-0.5)
  grad = lambda fn: jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True)
  with shd.use_rules(mesh, shd.DEFAULT_RULES), jax.set_mesh(mesh):
    (_, o), g = jax.jit(grad(ours))(q, k, v)
    text = jax.jit(ours).lower(q, k, v).as_text()
  (_, o_ref), g_ref = grad(ref)(q, k, v)
  assert "shard_map" in text or "sdy.manual_computation" in text
  assert rel_err(o, o_ref) < 1e-5
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5


def test_decode_runs_per_shard():
  t, s = 2, 48
  ints = batch_intervals([LAYOUT] * 4, s)
  q, k, v, _ = _inputs(5, 4, t, s, 4, 2, 32, jnp.float32)
  qi = (ints[0][:, :t], ints[1][:, :t] * 0 + s, ints[2], ints[3])
  qp = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32)[None], (4, t))
  mesh = shd.make_mesh("fsdp=4", devices=jax.devices()[:4])
  with jax.set_mesh(mesh):
    text = jax.jit(lambda *a: attention(*a, impl="decode")).lower(q, k, v, *qi, qp).as_text()
    out = jax.jit(lambda *a: attention(*a, impl="decode"))(q, k, v, *qi, qp)
  want = reference.reference_attention(q, k, v, *qi, qp, scale=32**-0.5)
  assert "sdy.manual_computation" in text or "shard_map" in text
  assert rel_err(out, want) < 1e-5


def test_target_is_the_mesh_device_not_jax_devices():
  assert target.current().platform == "cpu"
  assert why_not("pallas_tpu") is not None and why_not("pallas_gpu") is not None
  with jax.sharding.use_abstract_mesh(_abstract_mesh("tpu", "TPU v5 lite")):
    assert target.current() == target.Device("tpu", "TPU v5 lite", None)
    assert why_not("pallas_tpu") is None and "needs an NVIDIA GPU" in why_not("pallas_gpu")
    assert choose_impl(target.current(), 4096, 4096) == "pallas_tpu"
  with jax.sharding.use_abstract_mesh(_abstract_mesh("gpu", "NVIDIA H100 80GB HBM3")):
    assert target.current().compute_capability == 9.0
    assert choose_impl(target.current(), 64, 64) == "pallas_gpu"
  with jax.sharding.use_abstract_mesh(_abstract_mesh("gpu", "Tesla V100-SXM2-16GB")):
    assert "compute capability" in why_not("pallas_gpu")
    assert choose_impl(target.current(), 64, 64) == "reference"


def test_auto_lowers_the_mesh_kernel_inside_shard_map():
  """Under an abstract TPU mesh, impl='auto' picks the Mosaic kernel and lowers it per shard."""
  t = 256
  ints = batch_intervals([LAYOUT] * 4, t)
  q = jax.ShapeDtypeStruct((4, t, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((4, t, 4, 128), jnp.bfloat16)
  mesh = _abstract_mesh("tpu", "TPU v6 lite")
  with jax.sharding.use_abstract_mesh(mesh):
    sh = lambda spec: NamedSharding(mesh, spec)
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh(P("fsdp", None, "tensor")))
            for x in (q, kv, kv)]
    text = jax.jit(lambda q, k, v: attention(q, k, v, *ints)).trace(*args).lower(
        lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text and "bagel_interval_attention_fwd" in text
  assert "sdy.manual_computation" in text or "shard_map" in text
