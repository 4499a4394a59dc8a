"""Pre-training init benchmark: peak RSS and time of `convert.hf_to_bagel` on synthetic Hugging Face checkpoints.

    python -m bagel_jax.bench hf_init [--size 2|6] [--workdir DIR] [--keep]

Writes a random Qwen2 folder (bf16 shards + index; 28 layers, the full 152,064-row vocabulary), a
SigLIP folder (26 + 1 layers, 980 px / patch 14) and a FLUX ae.safetensors at the widths of
`bench.convert`'s size presets, then runs the converter in a fresh process per output format and
prints its wall time and peak RSS (the kernel's high-water mark of that process) against the
largest output tensor (the float32 embedding table).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

GB = 1e9


def _run(argv: list[str]) -> tuple[float, int]:
  """Seconds and peak RSS (bytes) of one child process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  t0 = time.perf_counter()
  p = subprocess.Popen([sys.executable, "-m", "convert.hf_to_bagel", *argv], env=env, stderr=subprocess.PIPE)
  _, status, ru = os.wait4(p.pid, 0)
  seconds = time.perf_counter() - t0
  err = p.stderr.read().decode() if p.stderr else ""
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"hf_to_bagel failed: {err[-2000:]}")
  return seconds, ru.ru_maxrss * 1024


def _du(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> None:
  from bagel_jax.bench.convert import PRESETS, scaled_config
  from bagel_jax.weights.hf_random import write_random_hf

  ap = argparse.ArgumentParser(prog="python -m bagel_jax.bench hf_init", description=__doc__.split("\n\n")[0])
  ap.add_argument("--size", choices=sorted(PRESETS), default="2")
  ap.add_argument("--workdir", type=pathlib.Path, default=None)
  ap.add_argument("--keep", action="store_true")
  ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)  # the input writer's process
  a = ap.parse_args(argv)
  work = a.workdir or pathlib.Path(tempfile.mkdtemp(prefix="bench_hf_init_"))
  cfg = scaled_config(**PRESETS[a.size]).replace(max_latent_size=32)
  if a.write_only:
    write_random_hf(work / "hf", cfg, shards=4)
    return
  # The inputs are written by another process: a child's peak RSS counts its parent's at the fork.
  subprocess.run([sys.executable, "-m", "bagel_jax.bench", "hf_init", "--size", a.size, "--workdir", str(work),
                  "--write-only"], check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  paths = {"llm": work / "hf/qwen2", "vit": work / "hf/siglip", "vae": work / "hf/ae.safetensors"}
  largest = cfg.llm.vocab_size * cfg.llm.hidden_size * 4
  print(f"inputs: LLM {_du(paths['llm']) / GB:.2f} GB (bf16), SigLIP {_du(paths['vit']) / GB:.2f} GB, "
        f"VAE {paths['vae'].stat().st_size / GB:.2f} GB; largest output tensor {largest / GB:.3f} GB (float32)")
  args = ["--llm", str(paths["llm"]), "--vit", str(paths["vit"]), "--vae", str(paths["vae"]), "--quiet"]
  for fmt in ("safetensors", "orbax"):
    dst = work / f"out_{fmt}"
    seconds, peak = _run(args + ["--dst", str(dst), "--format", fmt])
    print(f"{fmt:12s} {_du(dst) / GB:.2f} GB written in {seconds:.1f} s; peak RSS {peak / GB:.2f} GB "
          f"= largest tensor + {(peak - largest) / GB:.2f} GB")
    shutil.rmtree(dst, ignore_errors=True)
  if not a.keep:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
