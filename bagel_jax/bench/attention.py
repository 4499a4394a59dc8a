"""Attention benchmark on realistic BAGEL packed layouts.

    python -m bagel_jax.bench attention [--sizes 4096,8192,16384,32768] [--impls ...] [--json PATH]

Each size is one packed row of that many tokens filled with BAGEL-style samples (seeded):
text-to-image (prompt + noisy VAE latents), understanding (ViT block + answer text), editing /
interleaved (text, ViT, clean VAE, text, noisy VAE) and plain text; what does not fit is padding.
Heads follow Qwen2-7B (28 query heads, 4 KV heads, head dim 128, bf16) unless told otherwise.

For every backend it times the forward pass and forward+backward (a VJP with a fixed cotangent),
after one compiling call, as the median of --reps runs.  TFLOP/s count unmasked work only:
forward = 4 * visible (q, k) pairs * head_dim * query heads; forward+backward = 3.5x that (two
matmuls forward, five backward; the recomputation of P in the backward is not counted).  The
ratio columns are speedups: time of cudnn (dense mask) or xla_chunked divided by this backend's.

Defaults: on GPU pallas_gpu, cudnn, xla_chunked; on TPU pallas_tpu, xla_chunked; on CPU a small
size with reference, xla_chunked and the Pallas kernels in interpret mode (their times measure the
interpreter, not a kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

from bagel_jax.attention import blocks

CAUSAL, FULL, NOISE = "causal", "full", "noise"
Sample = list  # list of (length, mode)


# ----------------------------------------------------------------------------- layouts

def _image_tokens(rng, n_total: int, choices) -> int:
  fitting = [c for c in choices if c + 2 <= max(n_total // 4, 66)]
  return int(rng.choice(fitting or [64])) + 2  # + <vision_start>, <vision_end>


def draw_sample(rng: np.random.Generator, n_total: int) -> Sample:
  """One BAGEL training sample as (length, mode) splits."""
  vae = (256, 1024, 2304, 4096)  # 256, 512, 768, 1024 px: (px / 16)^2 latent tokens
  vit = (256, 729, 1024, 2304)  # SigLIP 14-px patches, NaViT sizes
  kind = rng.choice(["t2i", "und", "edit", "text"], p=[0.4, 0.25, 0.25, 0.1])
  text = lambda lo, hi: (int(rng.integers(lo, hi)), CAUSAL)
  if kind == "t2i":
    return [text(16, 96), (_image_tokens(rng, n_total, vae), NOISE)]
  if kind == "und":
    return [text(4, 32), (_image_tokens(rng, n_total, vit), FULL), text(32, 512)]
  if kind == "edit":
    return [text(8, 64), (_image_tokens(rng, n_total, vit), FULL), (_image_tokens(rng, n_total, vae), FULL),
            text(8, 64), (_image_tokens(rng, n_total, vae), NOISE)]
  return [text(128, 2048)]


def bagel_layout(n_total: int, seed: int = 0) -> list[Sample]:
  """Samples packed greedily into n_total tokens (a few retries per slot, like a first-fit packer)."""
  rng = np.random.default_rng(seed)
  samples, used = [], 0
  misses = 0
  while misses < 8:
    s = draw_sample(rng, n_total)
    n = sum(l for l, _ in s)
    if used + n > n_total:
      misses += 1
      continue
    samples.append(s)
    used += n
  return samples


def intervals(samples: list[Sample], n_total: int) -> tuple[np.ndarray, ...]:
  """(k_start, k_end, q_start, q_end) [n_total] int32 following DESIGN.md; the tail is padding."""
  ks, ke, qs, qe = (np.zeros(n_total, np.int32) for _ in range(4))
  pos = 0
  for splits in samples:
    s0, s1 = pos, pos + sum(l for l, _ in splits)
    for l, mode in splits:
      b0, b1 = pos, pos + l
      r = np.arange(b0, b1, dtype=np.int32)
      ks[b0:b1] = s0
      ke[b0:b1] = r + 1 if mode == CAUSAL else b1
      qs[b0:b1] = r if mode == CAUSAL else b0
      qe[b0:b1] = b1 if mode == NOISE else s1
      pos = b1
  return ks, ke, qs, qe


def visible_pairs(ks, ke, qs, qe, rows: int = 1024) -> int:
  """Number of (q, k) pairs the mask lets through, counted in row chunks (no T x S array)."""
  n = len(ks)
  kidx = np.arange(len(qs), dtype=np.int32)[None]
  total = 0
  for r0 in range(0, n, rows):
    q = np.arange(r0, min(n, r0 + rows), dtype=np.int32)[:, None]
    m = ((ks[r0:r0 + rows, None] <= kidx) & (kidx < ke[r0:r0 + rows, None]) & (qs[None] <= q) & (q < qe[None]))
    total += int(m.sum())
  return total


# ----------------------------------------------------------------------------- timing

@dataclasses.dataclass
class Row:
  tokens: int
  samples: int
  density: float  # visible pairs / T^2
  impl: str
  fwd_ms: float | None = None
  fwd_tflops: float | None = None
  fb_ms: float | None = None
  fb_tflops: float | None = None
  compile_s: float | None = None
  blocks_visited: float | None = None  # fraction of the (query block, key block) grid
  note: str = ""


def _time(fn, args, reps: int) -> tuple[float, float]:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return compile_s, statistics.median(times)


def _backend(impl: str):
  """(attention function, note) for a benchmark impl name; '+interpret' runs a Pallas kernel in
  the interpreter."""
  from bagel_jax.attention import registry

  if impl.endswith("+interpret"):
    base = impl.split("+")[0]
    mod = __import__(f"bagel_jax.attention.{base}", fromlist=["attention"])
    return functools.partial(mod.attention, interpret=True), "interpreter, not a kernel time"
  fn = registry.load(impl)
  return fn, ""


def _default_impls(platform: str) -> list[str]:
  if platform == "gpu":
    return ["pallas_gpu", "cudnn", "xla_chunked"]
  if platform == "tpu":
    return ["pallas_tpu", "xla_chunked"]
  return ["reference", "xla_chunked", "pallas_gpu+interpret", "pallas_tpu+interpret"]


def run(sizes, impls, *, heads: int, kv_heads: int, head_dim: int, dtype, reps: int, batch: int = 1,
        seed: int = 0, backward: bool = True, log=print) -> list[Row]:
  rows: list[Row] = []
  for n in sizes:
    samples = bagel_layout(n, seed)
    ks, ke, qs, qe = intervals(samples, n)
    pairs = visible_pairs(ks, ke, qs, qe)
    density = pairs / float(n * n)
    to_b = lambda x: jnp.asarray(np.broadcast_to(x, (batch, n)))
    ints = tuple(to_b(x) for x in (ks, ke, qs, qe))
    key = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(key[0], (batch, n, heads, head_dim), dtype)
    k = jax.random.normal(key[1], (batch, n, kv_heads, head_dim), dtype)
    v = jax.random.normal(key[2], (batch, n, kv_heads, head_dim), dtype)
    do = jax.random.normal(key[3], (batch, n, heads, head_dim), dtype)
    scale = head_dim**-0.5
    flops_fwd = 4.0 * pairs * head_dim * heads * batch
    for impl in impls:
      row = Row(n, len(samples), density, impl)
      rows.append(row)
      if impl == "reference" and batch * heads * n * n * 4 > 8e9:
        row.note = "skipped: dense logits exceed 8 GB"
        continue
      try:
        fn, row.note = _backend(impl)
        attn = lambda q, k, v: fn(q, k, v, *ints, None, scale=scale)
        fwd = jax.jit(attn)
        row.compile_s, t = _time(fwd, (q, k, v), reps)
        row.fwd_ms, row.fwd_tflops = t * 1e3, flops_fwd / t / 1e12
        if backward:
          fb = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
          _, t = _time(fb, (q, k, v, do), reps)
          row.fb_ms, row.fb_tflops = t * 1e3, 3.5 * flops_fwd / t / 1e12
        bs = _fwd_blocks(impl, dtype)
        if bs:
          sched = blocks.visit_schedule(*ints, block_q=bs[0], block_k=bs[1])
          grid = sched.shape[1] * (sched.shape[2] - 1)
          row.blocks_visited = float(jnp.sum(sched[..., 0])) / (grid * batch)
      except Exception as e:  # noqa: BLE001 - a benchmark row records the failure and moves on
        row.note = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
      log(_fmt_row(row, rows))
  return rows


def _fwd_blocks(impl: str, dtype):
  """The forward tiles a Pallas backend uses by default (for the blocks-visited column)."""
  for name in ("pallas_gpu", "pallas_tpu"):
    if impl.startswith(name):
      mod = __import__(f"bagel_jax.attention.{name}", fromlist=["default_block_sizes"])
      b = mod.default_block_sizes(dtype)
      return b.block_q, b.block_k
  return None


# ----------------------------------------------------------------------------- output

HEADER = ("| tokens | samples | density | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
          "| vs cudnn (fwd / fwd+bwd) | vs xla_chunked (fwd / fwd+bwd) | blocks visited | compile s | note |")
SEP = "|" + "---|" * 13


def _f(x, fmt):
  if x is None:
    return "-"
  if fmt == "tflops":
    return format(x, ".1f") if x >= 10 else format(x, ".3g")
  return format(x, fmt)


def _ratio(row: Row, rows: list[Row], base: str) -> str:
  ref = next((r for r in rows if r.tokens == row.tokens and r.impl == base), None)
  if ref is None or ref is row:
    return "-"
  fwd = ref.fwd_ms / row.fwd_ms if ref.fwd_ms and row.fwd_ms else None
  fb = ref.fb_ms / row.fb_ms if ref.fb_ms and row.fb_ms else None
  return f"{_f(fwd, '.2f')} / {_f(fb, '.2f')}"


def _fmt_row(r: Row, rows: list[Row]) -> str:
  return (f"| {r.tokens} | {r.samples} | {r.density:.3f} | {r.impl} | {_f(r.fwd_ms, '.2f')} | "
          f"{_f(r.fwd_tflops, 'tflops')} | {_f(r.fb_ms, '.2f')} | {_f(r.fb_tflops, 'tflops')} | "
          f"{_ratio(r, rows, 'cudnn')} | {_ratio(r, rows, 'xla_chunked')} | {_f(r.blocks_visited, '.3f')} | "
          f"{_f(r.compile_s, '.1f')} | {r.note} |")


def table(rows: list[Row]) -> str:
  return "\n".join([HEADER, SEP] + [_fmt_row(r, rows) for r in rows])


def main(argv=None) -> int:
  platform = jax.default_backend()
  accel = platform in ("gpu", "tpu")
  ap = argparse.ArgumentParser(prog="python -m bagel_jax.bench attention", description=__doc__.split("\n\n")[0])
  ap.add_argument("--sizes", default="4096,8192,16384,32768" if accel else "1024",
                  help="comma-separated packed lengths (tokens per row)")
  ap.add_argument("--impls", default=",".join(_default_impls(platform)),
                  help="comma-separated backends; NAME+interpret runs a Pallas kernel in the interpreter")
  ap.add_argument("--heads", type=int, default=28)
  ap.add_argument("--kv-heads", type=int, default=4)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--dtype", default="bfloat16" if accel else "float32")
  ap.add_argument("--reps", type=int, default=10 if accel else 3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no-backward", action="store_true", help="time the forward pass only")
  ap.add_argument("--json", default=None, help="also write the rows as JSON here")
  args = ap.parse_args(argv)
  sizes = [int(x) for x in args.sizes.split(",") if x]
  impls = [x for x in args.impls.split(",") if x]
  dev = jax.devices()[0]
  print(f"# attention benchmark on {getattr(dev, 'device_kind', platform)} ({platform}), jax {jax.__version__}; "
        f"B={args.batch} Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype}")
  print(HEADER)
  print(SEP)
  rows = run(sizes, impls, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
             dtype=jnp.dtype(args.dtype), reps=args.reps, batch=args.batch, seed=args.seed,
             backward=not args.no_backward)
  print()
  print(table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"platform": platform, "device": str(getattr(dev, "device_kind", platform)),
                 "args": vars(args), "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
