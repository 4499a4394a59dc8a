"""Builds BAGEL for pre-training from Hugging Face checkpoints, as upstream's pre-training `main()` does.

    python -m convert.hf_to_bagel --llm Qwen2.5-7B-Instruct --vit siglip-so400m-14-980-flash-attn2-navit \\
        --vae flux/ae.safetensors --dst bagel_init [--format safetensors|orbax] [--dtype float32|bfloat16]

The model arguments keep upstream's names and defaults (`train/pretrain_unified_navit.py`:
ModelArguments / TrainingArguments): --vit_select_layer -2, --vit_max_num_patch_per_side 70,
--max_latent_size 32, --latent_patch_size 2, --connector_act gelu_pytorch_tanh,
--interpolate_pos False, --llm_qk_norm True, --tie_word_embeddings False, --copy_init_moe True,
--timestep_shift 1.0; --tokenizer defaults to the --llm folder; --seed draws the new modules
(connector, vae2llm, time embedder).  The rules are `bagel_jax.weights.hf_init`; the folder is
written by `bagel_jax.weights.hf_export` (streamed, atomic).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys


def _bool(s: str) -> bool:
  if str(s).lower() in ("true", "1", "yes", "y"):
    return True
  if str(s).lower() in ("false", "0", "no", "n"):
    return False
  raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


def parser() -> argparse.ArgumentParser:
  from bagel_jax.weights.hf_export import DTYPES, FORMATS
  from bagel_jax.weights.hf_init import HFInitArgs

  ap = argparse.ArgumentParser(prog="python -m convert.hf_to_bagel", description=__doc__.split("\n\n")[0])
  paths = {"llm": "Qwen2 / Qwen2.5 folder (llm_path)", "vit": "SigLIP vision folder (vit_path)",
           "vae": "FLUX ae.safetensors (vae_path)"}
  for name, what in paths.items():
    ap.add_argument(f"--{name}", required=True, help=what)
  ap.add_argument("--dst", required=True, type=pathlib.Path, help="output folder (must not exist)")
  ap.add_argument("--format", choices=FORMATS, default="safetensors", help="release layout or Orbax (default %(default)s)")
  ap.add_argument("--dtype", choices=DTYPES, default="float32", help="stored dtype of the weights (default %(default)s)")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing destination (atomically)")
  ap.add_argument("--quiet", action="store_true", help="no progress bar")
  for f in dataclasses.fields(HFInitArgs):
    if f.name in paths:
      continue
    kind = _bool if f.type in (bool, "bool") else type(f.default)
    extra = dict(nargs="?", const=True) if kind is _bool else {}
    ap.add_argument(f"--{f.name}", type=kind, default=f.default, help=f"default {f.default!r}", **extra)
  return ap


def main(argv=None) -> None:
  from bagel_jax.weights import hf_export
  from bagel_jax.weights.hf_init import HFInit, HFInitArgs
  from convert.safetensors_to_orbax import Progress

  args = vars(parser().parse_args(argv))
  dst, fmt, dtype = args.pop("dst"), args.pop("format"), args.pop("dtype")
  overwrite, quiet = args.pop("overwrite"), args.pop("quiet")
  init = HFInit(HFInitArgs(**args))
  total = sum(4 * math.prod(init.shape_dtype(f, k)[0]) for f, k in init.sources)
  bar = Progress(total, "hf -> bagel", not quiet)
  try:
    done = hf_export.write(init, dst, fmt=fmt, dtype=dtype, overwrite=overwrite, on_tensor=bar.update)
  finally:
    bar.close()
  print(done.line())


def run(argv=None) -> None:
  """Console entry point; bad inputs end in one line on stderr and exit status 2."""
  from bagel_jax.tokenizer import TokenizerError
  from convert.safetensors_to_orbax import main_wrapper

  def guarded(a):
    try:
      main(a)
    except TokenizerError as e:
      from bagel_jax.weights.errors import CheckpointError
      raise CheckpointError(str(e)) from None
  sys.exit(main_wrapper(guarded, argv))


if __name__ == "__main__":
  run()
