"""Choose the kernel tiles of a target: `python -m bagel_jax.bench tiles --target v5e:1x1 [--target h100:1 ...]`.

For each candidate tile of the forward and of the backward kernels this prints the visited
(query block, key block) pairs on BAGEL packed rows (`bench.attention.bagel_layout`, seeds 0-1 at
`--tokens`), a roofline MODEL of the kernel's time on that target (below), and whether the target's
compiler accepts it (TPU: VMEM under the kernel's limit; GPU: shared memory per block).
Candidates are compiled best-modelled first, and compiling stops at the first one that fits:
that one is the target's choice (`bagel_jax.attention.tiles` holds the chosen entries; the
command prints the line to paste there).  Needs the `aot` extra.

The model, per query head and packed row (attention at head dim 128, bf16, 28/4 heads):
- forward: per visited block 4 bq bk d FLOPs and its K and V tiles (4 bk d bytes), plus the Q and
  O tiles once per query block; backward (dq and dk/dv kernels): 14 bq bk d FLOPs and K, V, Q and
  dO tiles (4 (bq + bk) d bytes) per visited block;
- time = max(FLOPs / (peak x efficiency), bytes / HBM bandwidth) + grid steps x step overhead.
- TPU: a grid step costs `TPU_STEP_SECONDS` whether it computes or not, and the grid walks every
  query block for as many steps as the busiest one visits (a dynamic bound, see `pallas_tpu`);
  tiles are fetched from HBM at every step (no cache); the MXU is `mxu` columns wide
  (efficiency min(1, bk / mxu)).
- GPU: the K and V tiles of a KV head are shared by its query heads through L2 (bytes / group); a
  program loops over its own visits (no padding steps, no per-step overhead modelled); with 8
  warps Triton splits block_q over the warps, 16 rows each, so block_q < 128 leaves tensor cores
  idle (efficiency min(1, bq / 128)).
The model ranks; only a device can time (`bench attention`, `launch/device_check.sh`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

# Compile-only: never initialise an accelerator backend (the CUDA plugin needs no GPU libraries here).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from bagel_jax.bench.blocks import _compile, _kernels

TPU_STEP_SECONDS = 0.35e-6  # fixed cost of one Pallas TPU grid step (order of magnitude quoted for Mosaic)
TPU_MXU = {"v4": 128, "v5e": 128, "v5p": 128, "v6e": 256, "tpu7x": 256}
GPU_WARP_ROWS = 16 * 8  # rows of block_q that keep 8 warps' tensor cores busy

# (block_q, block_k) candidates: forward, then backward (dq and dk/dv use the same pair).
CANDIDATES = {
    "tpu": (((256, 256), (512, 512), (1024, 512), (512, 1024), (1024, 1024)),
            ((256, 256), (512, 256), (512, 512), (1024, 512))),
    "gpu": (((64, 64), (128, 64), (128, 128), (256, 64)),
            ((64, 64), (128, 64), (64, 128), (128, 128))),
}
HEADS = (28, 4, 128)


@dataclasses.dataclass(frozen=True)
class Visits:
  visited: int  # (query block, key block) pairs visited, summed over rows
  q_steps: int  # TPU grid steps of the query-major kernels (forward, dq): nq x max visits, summed over rows
  k_steps: int  # TPU grid steps of the key-major kernel (dk/dv), per query head
  q_blocks: int
  grid: int  # all (query block, key block) pairs


def visits(layouts, bq: int, bk: int) -> Visits:
  """Visited blocks and TPU grid steps of the kernels' schedules on these rows (k_start, ... per row)."""
  import jax.numpy as jnp

  from bagel_jax.attention import blocks

  tot = Visits(0, 0, 0, 0, 0)
  for ints in layouts:
    t = ints[0].shape[0]
    p = blocks.pad_intervals(*[jnp.asarray(x)[None] for x in ints], None, blocks.cdiv(t, bq) * bq,
                             blocks.cdiv(t, bk) * bk)
    m = blocks.block_mask(p, bq, bk)[0]
    nq, nk = m.shape
    tot = Visits(tot.visited + int(m.sum()), tot.q_steps + nq * max(int(m.sum(1).max()), 1),
                 tot.k_steps + nk * max(int(m.sum(0).max()), 1), tot.q_blocks + nq, tot.grid + nq * nk)
  return tot


def model_seconds(spec, v: Visits, bq: int, bk: int, backward: bool, heads=HEADS) -> float:
  """Modelled kernel time for one row set, all query heads (see the module doc)."""
  hq, hkv, d = heads
  tpu = spec.platform == "tpu"
  if tpu:
    from bagel_jax.attention.target import tpu_generation
    eff = min(1.0, bk / TPU_MXU.get(tpu_generation(spec.device_kind) or "", 128))
  else:
    eff = min(1.0, bq / GPU_WARP_ROWS)
  share = 1 if tpu else hq // hkv
  if backward:
    flops = 14.0 * bq * bk * d * v.visited
    nbytes = 4.0 * d * v.visited * (bk / share + bq)
    steps = v.q_steps + v.k_steps
  else:
    flops = 4.0 * bq * bk * d * v.visited
    nbytes = 4.0 * bk * d * v.visited / share + 4.0 * bq * d * v.q_blocks
    steps = v.q_steps
  body = max(flops / (spec.peak_flops * eff), nbytes / spec.hbm_bandwidth)
  return hq * (body + (steps * TPU_STEP_SECONDS if tpu else 0.0))


def _try(fn, devices, t: int) -> str:
  try:
    return f"ok {_compile(fn, devices, t):.0f} s"
  except Exception as e:  # noqa: BLE001 - the compiler's refusal is the finding
    msg = str(e).lower()
    return ("VMEM exceeded" if "vmem" in msg else "shared memory exceeded" if "shared memory" in msg
            else f"error: {str(e).splitlines()[0][:60]}")


def _layouts(t: int, seeds=(0, 1)):
  from bagel_jax.bench.attention import bagel_layout, intervals

  return [intervals(bagel_layout(t, s), t) for s in seeds]


def _kernel(platform: str, fwd: tuple[int, int], bwd: tuple[int, int] | None):
  """The forward (bwd None) or forward + backward callable with these tiles."""
  if bwd is None:
    return _kernels(platform, *fwd)[0]
  import jax
  import jax.numpy as jnp

  from bagel_jax.attention import pallas_gpu, pallas_tpu

  mod = pallas_tpu if platform == "tpu" else pallas_gpu
  bs = mod.BlockSizes(block_q=fwd[0], block_k=fwd[1], block_q_bwd=bwd[0], block_k_bwd=bwd[1])
  loss = lambda q, k, v, *i: jnp.sum(mod.attention(q, k, v, *i, scale=0.1, block_sizes=bs).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


def choose(name: str, t: int, log=print, compile_all: bool = False) -> dict:
  """Rank and compile the candidates of one target (all of them, or until one fits); returns
  {"forward": (bq, bk), "backward": (bq, bk), "rows": [...]}."""
  from bagel_jax.aot import targets

  devices, spec = targets.resolve(name)
  lays = _layouts(t)
  chosen, rows = {}, []
  for kind, cands in zip(("forward", "backward"), CANDIDATES[spec.platform]):
    ranked = sorted(cands, key=lambda c: model_seconds(spec, visits(lays, *c), *c, kind == "backward"))
    for bq, bk in ranked:
      v = visits(lays, bq, bk)
      us = model_seconds(spec, v, bq, bk, kind == "backward") * 1e6
      status = "not compiled (a better-modelled tile fits)"
      if kind not in chosen or compile_all:
        status = _try(_kernel(spec.platform, chosen.get("forward", (bq, bk)), (bq, bk) if kind == "backward" else None),
                      devices, t)
        if status.startswith("ok") and kind not in chosen:
          chosen[kind] = (bq, bk)
      row = dict(target=name, kernel=kind, block_q=bq, block_k=bk, visited=round(v.visited / v.grid, 4),
                 model_us=round(us, 1), compile=status, chosen=chosen.get(kind) == (bq, bk))
      log("| " + " | ".join(str(row[k]) for k in ("target", "kernel", "block_q", "block_k", "visited", "model_us",
                                                   "compile")) + (" | **chosen** |" if row["chosen"] else " | |"))
      rows.append(row)
  return dict(target=name, kind=spec.device_kind, rows=rows, **chosen)


def table_entry(result: dict) -> str:
  """The `bagel_jax.attention.tiles` line for this target."""
  from bagel_jax.aot import targets

  f, b = result.get("forward"), result.get("backward")
  if not f or not b:
    return f"# {result['target']}: no candidate compiled"
  gen = result["target"].split(":")[0]
  if gen in targets.TPU_CHIPS:
    return f'"{gen}": TpuTiles({f[0]}, {f[1]}, {b[0]}, {b[1]}),'
  from bagel_jax.attention.target import nvidia_compute_capability
  return f"{nvidia_compute_capability(result['kind'])}: GpuTiles({f[0]}, {f[1]}, {b[0]}, {b[1]}),"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m bagel_jax.bench tiles", description=__doc__.splitlines()[0])
  p.add_argument("--target", action="append", required=True, help="e.g. v5e:1x1, h100:1 (one device is used)")
  p.add_argument("--tokens", type=int, default=8192, help="tokens per packed row (two rows, seeds 0 and 1)")
  p.add_argument("--all", action="store_true", help="compile every candidate, not only until one fits")
  a = p.parse_args(argv)
  print("| target | kernel | block_q | block_k | grid share visited | model us | compile | |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  results = [choose(name, a.tokens, compile_all=a.all) for name in a.target]
  print("\nbagel_jax/attention/tiles.py entries:")
  for r in results:
    print("  " + table_entry(r))
  return 0


if __name__ == "__main__":
  sys.exit(main())
