"""The kernels compiled for real TPU and GPU targets on this CPU host (needs the `aot` extra).

Each program is lowered under `jax.set_mesh` on a 4-device target mesh (batch over fsdp=2, heads
over tensor=2) and compiled by the target's own compiler: libtpu (Mosaic) for TPU v5e / v6e,
XLA GPU with Triton and ptxas for sm_80 (A100) and sm_90 (H100).  The kernels must appear as
their custom calls, and no all-gather may appear: each shard runs the kernel on its own rows
and heads (without shard_map Mosaic refuses to compile and the Triton call is replicated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bagel_jax import sharding as shd
from bagel_jax.aot import analysis, targets
from bagel_jax.attention import attention

TARGETS = ["v5e:2x2", "v6e:2x2", "a100-40:4", "h100:4"]
B, T, HQ, HKV, D, S_CACHE = 4, 512, 28, 4, 128, 1024


@pytest.fixture(scope="module", params=TARGETS)
def target_mesh(request):
  devices, spec = targets.resolve(request.param)
  assert len(devices) == 4 and spec.platform in ("tpu", "gpu")
  return shd.make_mesh("fsdp=2,tensor=2", devices=devices), spec


def _args(mesh, t: int, s: int):
  sh = lambda *spec: NamedSharding(mesh, P(*spec))
  q = jax.ShapeDtypeStruct((B, t, HQ, D), jnp.bfloat16, sharding=sh("fsdp", None, "tensor"))
  kv = jax.ShapeDtypeStruct((B, s, HKV, D), jnp.bfloat16, sharding=sh("fsdp", None, "tensor"))
  rows = lambda n: jax.ShapeDtypeStruct((B, n), jnp.int32, sharding=sh("fsdp"))
  return q, kv, kv, rows(t), rows(t), rows(s), rows(s), rows(t)


def _compile(fn, mesh, spec, *args):
  with jax.set_mesh(mesh):
    compiled = jax.jit(fn).lower(*args).compile()
  return analysis.analyze(compiled, spec, 0.0)


def _check(report, kernels: int):
  assert report.kernels == kernels, report
  assert report.collectives["all-gather"] == 0, report.collectives
  assert report.fits


def test_forward_compiles_per_shard(target_mesh):
  mesh, spec = target_mesh
  _check(_compile(lambda *a: attention(*a), mesh, spec, *_args(mesh, T, T)), 1)


def test_backward_compiles_per_shard(target_mesh):
  mesh, spec = target_mesh

  def loss(q, k, v, *ints):
    return jnp.sum(attention(q, k, v, *ints).astype(jnp.float32))

  grads = jax.grad(loss, argnums=(0, 1, 2))
  _check(_compile(grads, mesh, spec, *_args(mesh, T, T)), 3)  # forward, dq, dk/dv


def test_decode_compiles_per_shard(target_mesh):
  """One query per row against a long cache: the Mosaic kernel on TPU, the Triton split-K kernel on GPU."""
  mesh, spec = target_mesh
  impl = "decode" if spec.platform == "gpu" else "auto"
  report = _compile(lambda *a: attention(*a, impl=impl), mesh, spec, *_args(mesh, 1, S_CACHE))
  _check(report, 1)


def test_kernel_is_really_compiled_for_the_target():
  """A tile larger than the target's on-chip memory fails in the target's compiler."""
  from bagel_jax.attention import pallas_gpu, pallas_tpu

  for name, call in (("v5e:2x2", lambda *a: pallas_tpu.attention(
      *a, scale=0.1, block_sizes=pallas_tpu.BlockSizes(vmem_limit_bytes=1 << 20))),
                     ("a100-40:4", lambda *a: pallas_gpu.attention(
                         *a, scale=0.1, block_sizes=pallas_gpu.BlockSizes(block_q=256, block_k=256)))):
    devices, spec = targets.resolve(name)
    mesh = shd.make_mesh("fsdp=4", devices=devices)
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())) for x in _args(mesh, T, T)]
    with pytest.raises(Exception, match="(?i)vmem|shared memory"):
      with jax.set_mesh(mesh):
        jax.jit(jax.shard_map(call, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)).lower(*args).compile()


def test_named_targets_resolve():
  for name, n, kind in (("v4:2x2x1", 4, "TPU v4"), ("v5p:2x2x1", 4, "TPU v5"), ("tpu7x:2x2x1", 8, "TPU7x"),
                        ("a100-80:8", 8, "NVIDIA A100-SXM4-80GB"), ("h200:2x8", 16, "NVIDIA H200 141GB HBM3e"),
                        ("b200:1", 1, "NVIDIA B200")):
    devices, spec = targets.resolve(name)
    assert len(devices) == n == spec.num_devices and spec.device_kind == kind
  _, h100 = targets.resolve("h100:1")
  assert 980e12 < h100.peak_flops < 1000e12 and 80e9 < h100.memory_bytes < 86e9 and h100.compute_capability == 9.0
  for bad in ("v9:2x2", "h100", "h100:0", "a100-40:two"):
    with pytest.raises(targets.TargetError):
      targets.resolve(bad)
