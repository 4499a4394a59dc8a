"""One device check for a GPU or TPU host: `python -m bagel_jax.bench device --out DIR` (or launch/device_check.sh).

Runs, each section timed and guarded (a failing section records its error and the rest go on):
1. kernels: the target's Pallas kernel against the dense reference in bf16 on BAGEL packed
   layouts (forward, gradients, and a decode query against a cache), relative errors;
2. attention: `bench attention` (our kernel vs cuDNN / XLA) on packed rows of 8k and 16k tokens;
3. generate: `bench generate` at full width with random weights: 1024 px, 50 steps, CFG (all
   28 layers: 14 GiB of bf16 weights fit on one 80 GB device), end-to-end and per-step time;
4. train: the 7B train step (fp32 master weights, AdamW, remat full, bf16 compute) on a slice of
   `--train_layers` decoder layers and one packed row, step time, peak memory and MFU from the
   model FLOPs of that slice; the full-depth step time is extrapolated linearly (stated so);
5. the process's peak device memory.
Writes DIR/device_check.json and DIR/device_check.md (a table to paste into docs/benchmarks.md).
`--tiny` runs the same code path on CPU with the tiny model and interpreted kernels (the tests).
Budget: about 8 minutes on one H100 / H200 or one TPU host (sections print their times).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback
from typing import Any, Callable


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bagel_jax.bench device", description=__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/device_check", help="folder for device_check.json / .md")
  p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, interpreted kernels")
  p.add_argument("--sections", default="kernels,attention,generate,train,memory")
  p.add_argument("--train_layers", type=int, default=4)
  p.add_argument("--train_tokens", type=int, default=8192)
  p.add_argument("--steps", type=int, default=50, help="denoising timesteps")
  return p


def _rel(a, b) -> float:
  import numpy as np

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _kernel_impl(platform: str) -> tuple[str, dict]:
  if platform == "tpu":
    return "pallas_tpu", {}
  if platform == "gpu":
    return "pallas_gpu", {}
  return "pallas_tpu", {"interpret": True}  # CPU: the interpreter checks the same code


def kernels(a, platform: str) -> dict[str, Any]:
  """bf16 kernel vs float32 dense reference on a BAGEL layout: forward, dq/dk/dv, decode."""
  import jax
  import jax.numpy as jnp

  from bagel_jax.attention import decode, reference, registry
  from bagel_jax.bench.attention import bagel_layout, intervals

  n, hq, hkv, d = (256, 4, 2, 64) if a.tiny else (8192, 28, 4, 128)
  impl, kw = _kernel_impl(platform)
  samples = bagel_layout(n, 1)
  ints = tuple(jnp.asarray(x)[None] for x in intervals(samples, n))
  key = jax.random.split(jax.random.PRNGKey(0), 4)
  q, do = (jax.random.normal(key[i], (1, n, hq, d), jnp.float32) for i in (0, 3))
  k, v = (jax.random.normal(key[i], (1, n, hkv, d), jnp.float32) for i in (1, 2))
  fn = registry.load(impl)
  ours = lambda q, k, v: fn(q, k, v, *ints, None, scale=d**-0.5, **kw)
  ref = lambda q, k, v: reference.reference_attention(q, k, v, *ints, scale=d**-0.5)
  bf = lambda *xs: [x.astype(jnp.bfloat16) for x in xs]
  o, vjp = jax.vjp(jax.jit(ours), *bf(q, k, v))
  grads = vjp(do.astype(jnp.bfloat16))
  o_ref, vjp_ref = jax.vjp(ref, q, k, v)
  grads_ref = vjp_ref(do)
  res = {"impl": impl, "tokens": n, "heads": f"{hq}/{hkv}x{d}", "forward_rel_err": _rel(o, o_ref)}
  res.update({f"d{x}_rel_err": _rel(g, r) for x, g, r in zip("qkv", grads, grads_ref)})
  # decode: the last 4 tokens of the packed samples (not the padding) as queries, the row as the cache
  t, used = 4, sum(length for sample in samples for length, _ in sample)
  qi = (ints[0][:, used - t:used], ints[1][:, used - t:used], ints[2], ints[3])
  qp = jnp.arange(used - t, used, dtype=jnp.int32)[None]
  dec_impl = "pallas_gpu" if platform == "gpu" else "xla"
  qd = q[:, used - t:used]
  dec = decode.attention(*bf(qd, k, v), *qi, qp, scale=d**-0.5, impl=dec_impl)
  want = reference.reference_attention(qd, k, v, *qi, qp, scale=d**-0.5)
  res.update(decode_impl=dec_impl, decode_rel_err=_rel(dec, want))
  res["ok"] = all(v < 2e-2 for k_, v in res.items() if k_.endswith("rel_err"))
  return res


def attention(a, platform: str) -> dict[str, Any]:
  import dataclasses

  import jax.numpy as jnp

  from bagel_jax.bench import attention as bench

  impls = bench._default_impls(platform)
  sizes = [256] if a.tiny else [8192, 16384]
  heads = (4, 2, 64) if a.tiny else (28, 4, 128)
  rows = bench.run(sizes, impls, heads=heads[0], kv_heads=heads[1], head_dim=heads[2],
                   dtype=jnp.float32 if a.tiny else jnp.bfloat16, reps=2 if a.tiny else 5)
  return {"rows": [dataclasses.asdict(r) for r in rows], "table": bench.table(rows)}


def generate(a, platform: str) -> dict[str, Any]:
  from bagel_jax.bench import generate as bench

  argv = ["--config", "tiny" if a.tiny else "7b", "--steps", str(3 if a.tiny else a.steps)]
  return bench.run(bench.parser().parse_args(argv))


def train(a, platform: str) -> dict[str, Any]:
  from bagel_jax.bench import train_step

  if a.tiny:  # the smoke run: 2 layers of the tiny model on 128 tokens
    return train_step.run(True, 2, 128, reps=1)
  return train_step.run(False, a.train_layers, a.train_tokens)


def memory(a, platform: str) -> dict[str, Any]:
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return {k: round(stats[k] / 2**30, 3) for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}


SECTIONS: dict[str, Callable] = {"kernels": kernels, "attention": attention, "generate": generate,
                                 "train": train, "memory": memory}


def _run_section(name: str, a, platform: str) -> dict[str, Any]:
  t0 = time.perf_counter()
  try:
    res = SECTIONS[name](a, platform)
  except Exception as e:  # noqa: BLE001 - a device check reports what failed and runs the rest
    res = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300], "traceback": traceback.format_exc()[-2000:]}
  res["seconds"] = round(time.perf_counter() - t0, 2)
  print(f"[device check] {name}: {res['seconds']} s{' ERROR ' + res['error'] if 'error' in res else ''}",
        flush=True)
  return res


def markdown(report: dict[str, Any]) -> str:
  lines = [f"### Device check: {report['device']} ({report['platform']}, jax {report['jax']})", "",
           "| section | figure | value |", "| --- | --- | --- |"]
  for name, res in report["sections"].items():
    for key, val in res.items():
      if key in ("traceback", "rows", "table") or isinstance(val, (dict, list)):
        continue
      lines.append(f"| {name} | {key} | {val:.4g} |" if isinstance(val, float) else f"| {name} | {key} | {val} |")
  att = report["sections"].get("attention", {}).get("table")
  if att:
    lines += ["", "Attention (ms, TFLOP/s):", "", "```", att, "```"]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  a = parser().parse_args(argv)
  names = [s.strip() for s in a.sections.split(",") if s.strip()]
  bad = [s for s in names if s not in SECTIONS]
  if bad:
    print(f"device check: unknown section {bad[0]!r}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
    return 2
  import jax

  dev = jax.devices()[0]
  if dev.platform == "cpu" and not a.tiny:
    print("device check: no GPU or TPU here (use --tiny for the CPU smoke run)", file=sys.stderr)
    return 2
  report = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__, "tiny": a.tiny,
            "sections": {}}
  for name in names:
    report["sections"][name] = _run_section(name, a, dev.platform)
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
  (out / "device_check.md").write_text(markdown(report))
  print(markdown(report))
  return 0 if all("error" not in r for r in report["sections"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
