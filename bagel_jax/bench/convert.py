"""Converter benchmark: peak RSS and throughput of safetensors <-> Orbax on synthetic checkpoints.

    python -m bagel_jax.bench convert [--sizes 2,6] [--workdir DIR] [--keep]

For each size it writes a synthetic release folder with the full release key set (all
1223 ema tensors of BAGEL-7B-MoT: 28 MoT layers, 26 ViT layers, the full FLUX VAE in
ae.safetensors) at scaled-down widths, then measures, each in a fresh process:

  baseline  a plain read + write of the same bytes (64 MB blocks, fsync at the end);
  convert   `convert.safetensors_to_orbax` (peak RSS from the kernel's high-water mark);
  export    `convert.orbax_to_safetensors`, checked byte-identical to the source files;

twice each, interleaved, keeping the faster run of each (the machine may be shared), and
prints the budget (1.5 GB + 2x the largest upstream tensor), peak RSS, CPU time and the
ratio of each conversion's time to the baseline's.  The synthetic-folder writer is also used by the
tests (`write_synthetic_release`).
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import json
import math
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

from bagel_jax.config import BagelConfig, LLMConfig, ViTConfig, VAEConfig, bagel_7b_mot

GB = 1e9


# ----------------------------------------------------------------------------- synthetic release folders
def scaled_config(*, hidden: int, intermediate: int, heads: int, kv_heads: int, vit_hidden: int,
                  vit_intermediate: int, vit_heads: int, vocab: int = 152064, vae_ch: int = 128) -> BagelConfig:
  """BAGEL-7B-MoT with other widths: still 28 MoT layers, 26 ViT layers, the release key set."""
  base = bagel_7b_mot()
  return base.replace(
      llm=dataclasses.replace(base.llm, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                              num_attention_heads=heads, num_key_value_heads=kv_heads),
      vit=dataclasses.replace(base.vit, hidden_size=vit_hidden, intermediate_size=vit_intermediate,
                              num_attention_heads=vit_heads),
      vae=dataclasses.replace(base.vae, ch=vae_ch),
  )


# Sizes for the benchmark (GB of ema + ae, about) and a small one for the tests.
PRESETS = {
    "2": dict(hidden=768, intermediate=4096, heads=6, kv_heads=2, vit_hidden=576, vit_intermediate=2152,
              vit_heads=8),
    "6": dict(hidden=1536, intermediate=6912, heads=12, kv_heads=4, vit_hidden=1152, vit_intermediate=4304,
              vit_heads=16),
    "test": dict(hidden=32, intermediate=64, heads=4, kv_heads=2, vit_hidden=16, vit_intermediate=32, vit_heads=2,
                 vocab=256, vae_ch=32),
}


def write_configs(folder, cfg: BagelConfig) -> None:
  """llm_config.json, vit_config.json and bagel_config.json that `load_config` reads back as `cfg`."""
  from bagel_jax.config import load_config

  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  llm = {f.name: getattr(cfg.llm, f.name) for f in dataclasses.fields(LLMConfig)}
  llm.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], torch_dtype="bfloat16")
  vit = {f.name: getattr(cfg.vit, f.name) for f in dataclasses.fields(ViTConfig)}
  vit["num_hidden_layers"] = cfg.vit.num_hidden_layers + 1  # upstream builds num_hidden_layers - 1
  vit.update(model_type="siglip_vision_model")
  extra = {k: getattr(cfg, k) for k in ("visual_gen", "visual_und", "latent_patch_size", "max_latent_size",
                                         "vit_max_num_patch_per_side", "connector_act", "interpolate_pos",
                                         "timestep_shift", "frequency_embedding_size")}
  extra["vae"] = {f.name: getattr(cfg.vae, f.name) for f in dataclasses.fields(VAEConfig)}
  extra["vae"]["ch_mult"] = list(cfg.vae.ch_mult)
  extra["special_token_ids"] = dataclasses.asdict(cfg.tokens)
  for name, obj in (("llm_config.json", llm), ("vit_config.json", vit), ("bagel_config.json", extra)):
    (folder / name).write_text(json.dumps(obj, indent=1) + "\n")
  back = load_config(folder)
  assert back == cfg, (back, cfg)


def _random_tensor(rng: np.random.Generator, shape, st_dtype: str) -> np.ndarray:
  """Finite random values, distinct per tensor, cheap to make: random mantissas and signs at a fixed exponent."""
  from bagel_jax.weights.safetensors_io import ST_DTYPES

  n = math.prod(shape)
  if st_dtype == "BF16":
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    bits &= 0x807F
    bits |= 0x3C00  # exponent 2^-7
    return bits.view(ST_DTYPES["BF16"]).reshape(shape)
  if st_dtype == "F32":
    bits = rng.integers(0, 1 << 32, size=n, dtype=np.uint32)
    bits &= 0x807FFFFF
    bits |= 0x3C000000
    return bits.view(np.float32).reshape(shape)
  raise ValueError(st_dtype)


def write_synthetic_release(folder, cfg: BagelConfig, *, seed: int = 0, shards: int = 0, tokenizer: bool = True
                            ) -> dict:
  """A release-layout folder for `cfg` with random weights under every name of the weights table.

  `shards` > 0 splits the ema tensors over that many files listed by model.safetensors.index.json.
  Returns {"tensors", "bytes", "largest", "largest_key"}.
  """
  from bagel_jax.weights import table as W
  from bagel_jax.api import BagelModel
  from bagel_jax.weights.safetensors_io import ST_DTYPES, SafetensorsWriter

  folder = pathlib.Path(folder)
  write_configs(folder, cfg)
  abstract = BagelModel(cfg).abstract_params()
  by_file: dict[str, list] = {f: [] for f in W.FILE_NAMES}
  for r in W.rules(cfg):
    by_file[r.file].append((r.upstream, W.expected_upstream_shape(r, abstract), W.FILE_DTYPES[r.file]))
  rng = np.random.default_rng(seed)
  stats = {"tensors": 0, "bytes": 0, "largest": 0, "largest_key": ""}

  def write(path, entries):
    w = SafetensorsWriter(path, entries)
    for key, shape, d in entries:
      x = _random_tensor(rng, shape, d)
      w.write(key, x)
      stats["tensors"] += 1
      stats["bytes"] += x.nbytes
      if x.nbytes > stats["largest"]:
        stats["largest"], stats["largest_key"] = x.nbytes, key
    w.close()

  for file_id, entries in by_file.items():
    entries.sort()
    if file_id == "ema" and shards > 0:
      total = sum(math.prod(s) * ST_DTYPES[d].itemsize for _, s, d in entries)
      groups: list[list] = [[] for _ in range(shards)]
      acc = 0
      for e in entries:
        groups[min(int(acc * shards / max(total, 1)), shards - 1)].append(e)
        acc += math.prod(e[1]) * ST_DTYPES[e[2]].itemsize
      weight_map = {}
      for i, g in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write(folder / name, g)
        weight_map.update({k: name for k, _, _ in g})
      (folder / "model.safetensors.index.json").write_text(
          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    else:
      write(folder / W.FILE_NAMES[file_id], entries)
  if tokenizer:
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n")
  return stats


# ----------------------------------------------------------------------------- measurements (each in a fresh process)
def plain_copy(src: pathlib.Path, dst: pathlib.Path, block: int = 64 << 20) -> dict:
  """Reads every .safetensors file of `src` and writes its bytes under `dst` (one reused buffer, fsync)."""
  dst.mkdir(parents=True, exist_ok=True)
  buf = bytearray(block)
  view = memoryview(buf)
  n = 0
  t0 = time.perf_counter()
  for f in sorted(src.glob("*.safetensors")):
    with open(f, "rb", buffering=0) as fi, open(dst / f.name, "wb", buffering=0) as fo:
      while True:
        k = fi.readinto(buf)
        if not k:
          break
        fo.write(view[:k])
        n += k
      os.fsync(fo.fileno())
  return {"seconds": time.perf_counter() - t0, "bytes": n}


def _worker(argv) -> None:
  kind, src, dst = argv
  rss0 = _rss_now()
  if kind == "baseline":
    out = plain_copy(pathlib.Path(src), pathlib.Path(dst))
  elif kind == "convert":
    from convert.safetensors_to_orbax import convert
    s = convert(src, dst, progress=False)
    out = {"seconds": s.seconds, "setup_s": s.setup_seconds, "bytes": s.bytes, "tensors": s.tensors}
  elif kind == "export":
    from convert.orbax_to_safetensors import export
    s = export(src, dst, progress=False)
    out = {"seconds": s.seconds, "setup_s": s.setup_seconds, "bytes": s.bytes, "tensors": s.tensors}
  else:
    raise SystemExit(f"unknown worker {kind}")
  ru = resource.getrusage(resource.RUSAGE_SELF)
  out["peak_rss"] = ru.ru_maxrss * 1024
  out["cpu_s"] = ru.ru_utime + ru.ru_stime
  out["rss_at_start"] = rss0
  print("RESULT " + json.dumps(out), flush=True)


def _rss_now() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run_worker(kind: str, src, dst) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "bagel_jax.bench.convert", "--worker", kind, str(src), str(dst)],
                     capture_output=True, text=True, env=env)
  lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
  if p.returncode != 0 or not lines:
    raise RuntimeError(f"{kind} worker failed ({p.returncode}):\n{p.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def bench_size(name: str, workdir: pathlib.Path, keep: bool = False) -> dict:
  cfg = scaled_config(**PRESETS[name])
  root = workdir / f"size_{name}"
  shutil.rmtree(root, ignore_errors=True)
  src, copy, orbax, back = root / "release", root / "copy", root / "orbax", root / "export"
  t0 = time.perf_counter()
  stats = write_synthetic_release(src, cfg)
  gen_s = time.perf_counter() - t0
  # Each measurement twice, interleaved (baseline, convert, export, baseline, ...), so that
  # both sides see the same machine; the faster run of each counts.
  runs: dict[str, list] = {"baseline": [], "convert": [], "export": []}
  try:
    for _ in range(2):
      runs["baseline"].append(_run_worker("baseline", src, copy))
      shutil.rmtree(copy)
      shutil.rmtree(orbax, ignore_errors=True)
      runs["convert"].append(_run_worker("convert", src, orbax))
      shutil.rmtree(back, ignore_errors=True)
      runs["export"].append(_run_worker("export", orbax, back))
    identical = all(filecmp.cmp(src / f, back / f, shallow=False) for f in ("ema.safetensors", "ae.safetensors"))
  finally:
    if not keep:
      shutil.rmtree(root, ignore_errors=True)
  best = {k: min(v, key=lambda m: m["seconds"]) for k, v in runs.items()}
  budget = 1.5 * GB + 2 * stats["largest"]
  return {"size": name, "cfg": PRESETS[name], "gen_s": gen_s, **stats, "baseline": best["baseline"],
          "convert": best["convert"], "export": best["export"],
          "runs_s": {k: [m["seconds"] for m in v] for k, v in runs.items()},
          "peak_rss": {k: max(m["peak_rss"] for m in v) for k, v in runs.items()},
          "budget": budget, "identical": identical, "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def report(r: dict) -> str:
  b, base = r["bytes"], r["baseline"]["seconds"]

  def row(name, key, extra=""):
    m = r[key]
    stream = m["seconds"] - m["setup_s"]
    rss = r["peak_rss"][key]
    return (f"  {name:18s} {m['seconds']:6.1f} s  {b / GB / m['seconds']:.2f} GB/s  "
            f"{m['seconds'] / base:.2f}x baseline (streaming {stream:.1f} s after {m['setup_s']:.1f} s of imports/validation: {stream / base:.2f}x)  "
            f"CPU {m['cpu_s']:.1f} s  peak RSS {rss / GB:.2f} GB ({'within' if rss <= r['budget'] else 'OVER'} "
            f"budget)  runs {', '.join(f'{s:.1f}' for s in r['runs_s'][key])} s{extra}")

  return "\n".join([
      f"synthetic {r['size']} GB: {r['tensors']} tensors, {b / GB:.2f} GB, largest {r['largest_key']} "
      f"{r['largest'] / GB:.3f} GB; peak-RSS budget 1.5 GB + 2 x largest = {r['budget'] / GB:.2f} GB; "
      f"load average {r['loadavg']}",
      f"  {'plain read+write':18s} {base:6.1f} s  {b / GB / base:.2f} GB/s  CPU {r['baseline']['cpu_s']:.1f} s  "
      f"runs {', '.join(f'{s:.1f}' for s in r['runs_s']['baseline'])} s",
      row("safetensors->orbax", "convert"),
      row("orbax->safetensors", "export", f"; round trip {'byte-identical' if r['identical'] else 'DIFFERS'}"),
  ])


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(prog="python -m bagel_jax.bench convert", description=__doc__.split("\n\n")[0])
  ap.add_argument("--sizes", default="2,6", help="comma-separated presets: " + ", ".join(PRESETS))
  ap.add_argument("--workdir", type=pathlib.Path, default=None, help="scratch folder (default: a temp dir)")
  ap.add_argument("--keep", action="store_true", help="keep the synthetic folders")
  ap.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
  ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    return _worker(args.worker)
  import tempfile
  workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="bagel_convert_bench."))
  workdir.mkdir(parents=True, exist_ok=True)
  results = []
  for name in args.sizes.split(","):
    r = bench_size(name.strip(), workdir, keep=args.keep)
    results.append(r)
    print(report(r), flush=True)
  if args.json:
    args.json.write_text(json.dumps(results, indent=1) + "\n")
  if not args.keep and args.workdir is None:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
