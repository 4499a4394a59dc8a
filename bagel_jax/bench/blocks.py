"""Kernel tile sizes checked by the target's compiler: `python -m bagel_jax.bench blocks --target v5e:1 [--target h100:1]`.

For each candidate (block_q, block_k) of the forward and of the backward kernels, compiles the
kernel (one device of the target, a BAGEL packed row of `--tokens` tokens, 28/4 heads x 128,
bf16) with the target's compiler and records whether it fits the on-chip memory (TPU VMEM under
the kernel's limit, GPU shared memory per block), the compile time, and the share of the
(query block, key block) grid the visit schedule walks on that layout (smaller tiles skip more
masked work but pay more per-step overhead; only a device can weigh that, see
`bench attention`).  Needs the `aot` extra.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time

TPU_TILES = ((128, 128), (256, 256), (512, 512), (1024, 512), (1024, 1024))
GPU_TILES = ((64, 32), (64, 64), (128, 64), (128, 128), (256, 128))


def _compile(kernel, devices, t: int, heads=(28, 4, 128)):
  import jax
  import jax.numpy as jnp

  from bagel_jax import sharding as shd

  hq, hkv, d = heads
  mesh = shd.make_mesh("fsdp=1", devices=devices[:1])
  q = jax.ShapeDtypeStruct((1, t, hq, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, t, hkv, d), jnp.bfloat16)
  ints = [jax.ShapeDtypeStruct((1, t), jnp.int32)] * 5
  t0 = time.time()
  with jax.set_mesh(mesh):
    jax.jit(kernel).lower(q, kv, kv, *ints).compile()
  return time.time() - t0


def _visited(t: int, bq: int, bk: int) -> float:
  import jax.numpy as jnp

  from bagel_jax.attention import blocks
  from bagel_jax.bench.attention import bagel_layout, intervals

  ints = [jnp.asarray(x)[None] for x in intervals(bagel_layout(t, 0), t)]
  sched = blocks.visit_schedule(*ints, block_q=bq, block_k=bk)
  return float(jnp.sum(sched[..., 0])) / (sched.shape[1] * (sched.shape[2] - 1))


def _kernels(platform: str, bq: int, bk: int):
  """(forward, forward+backward) callables with these tiles for every kernel of the pass."""
  import jax
  import jax.numpy as jnp

  from bagel_jax.attention import pallas_gpu, pallas_tpu

  if platform == "tpu":
    bs = pallas_tpu.BlockSizes(block_q=bq, block_k=bk, block_q_bwd=bq, block_k_bwd=bk)
    fn = lambda q, k, v, *i: pallas_tpu.attention(q, k, v, *i, scale=0.1, block_sizes=bs)
  else:
    bs = pallas_gpu.BlockSizes(block_q=bq, block_k=bk, block_q_bwd=min(bq, bk), block_k_bwd=min(bq, bk))
    fn = lambda q, k, v, *i: pallas_gpu.attention(q, k, v, *i, scale=0.1, block_sizes=bs)
  loss = lambda q, k, v, *i: jnp.sum(fn(q, k, v, *i).astype(jnp.float32))
  return fn, jax.grad(loss, argnums=(0, 1, 2))


def sweep(name: str, t: int, log=print) -> list[dict]:
  from bagel_jax.aot import targets

  devices, spec = targets.resolve(name)
  rows = []
  for bq, bk in TPU_TILES if spec.platform == "tpu" else GPU_TILES:
    row = {"target": name, "kind": spec.device_kind, "block_q": bq, "block_k": bk,
           "visited": round(_visited(t, bq, bk), 4)}
    for label, kernel in zip(("fwd", "fwd+bwd"), _kernels(spec.platform, bq, bk)):
      try:
        row[label] = f"ok {_compile(kernel, devices, t):.1f} s"
      except Exception as e:  # noqa: BLE001 - the compiler's refusal is the finding
        msg = str(e).lower()
        row[label] = ("VMEM exceeded" if "vmem" in msg else "shared memory exceeded" if "shared memory" in msg
                      else f"error: {str(e).splitlines()[0][:80]}")
    log("| " + " | ".join(str(row[k]) for k in ("target", "block_q", "block_k", "visited", "fwd", "fwd+bwd")) + " |")
    rows.append(row)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m bagel_jax.bench blocks", description=__doc__.splitlines()[0])
  p.add_argument("--target", action="append", required=True)
  p.add_argument("--tokens", type=int, default=8192)
  a = p.parse_args(argv)
  print("| target | block_q | block_k | grid share visited | forward | forward + backward |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name in a.target:
    sweep(name, a.tokens)
  return 0


if __name__ == "__main__":
  sys.exit(main())
