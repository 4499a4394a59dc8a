"""The web app (upstream's app.py): text to image, image editing and image understanding in a browser.

    pip install -e '.[app]'
    python -m bagel_jax.app --checkpoint ByteDance-Seed/BAGEL-7B-MoT          # http://127.0.0.1:7860
    python -m bagel_jax.app --checkpoint runs/shapes                           # the shapes demo, on CPU
    python -m bagel_jax.app --checkpoint /data/BAGEL-7B-MoT --quantize int8    # upstream's --mode 3

--checkpoint: a release folder, a folder converted to Orbax, a Hugging Face repo id, or a training
run's workdir (its latest checkpoint, EMA weights).  Serves on 127.0.0.1 unless --server-name says
otherwise; requests are served one at a time by one model.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

# The shapes demo's vocabulary: prompts it can read (upstream's example prompts are for the release).
SHAPES_PROMPTS = {"t2i": "a red triangle at the bottom right", "edit": "two blue squares",
                  "und": "what colour are the shapes"}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bagel_jax.app", description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True,
                 help="release folder, converted Orbax folder, Hugging Face repo id, or training workdir")
  p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
  p.add_argument("--quantize", choices=("none", "int8"), default="none", help="int8: weight-only int8 decoder kernels")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                 help="default bfloat16 on a GPU/TPU, float32 on CPU (a training run: its own)")
  p.add_argument("--attention", default="auto", help="attention backend (auto, reference, xla_chunked, ...)")
  p.add_argument("--server-name", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
  p.add_argument("--server-port", type=int, default=7860)
  p.add_argument("--share", action="store_true", help="a public gradio.live link (needs internet)")
  p.add_argument("--inbrowser", action="store_true", help="open the page in the default browser")
  return p


def load_service(args):
  """The one Inferencer for every request, wrapped in the app's Service."""
  import jax
  import jax.numpy as jnp

  from bagel_jax.app.service import Service
  from bagel_jax.inference import Inferencer
  from bagel_jax.inference.quantize import quantize_params
  from bagel_jax.train.restore import is_run, load_run

  dtype = None if args.dtype is None else getattr(jnp, args.dtype)
  if is_run(args.checkpoint):
    run = load_run(args.checkpoint, dtype=dtype)
    inf = Inferencer(run.model, quantize_params(run.params, args.quantize, free_inputs=True), run.tokenizer)
    what = f"training run, step {run.step} ({run.weights})"
  else:
    inf = Inferencer.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, quantize=args.quantize, dtype=dtype,
                                     attention_impl=args.attention)
    what = "checkpoint"
  dt = jax.tree.leaves(inf.params)[0].dtype
  label = (f"`{args.checkpoint}` ({what}) on {jax.default_backend().upper()}, {dt}"
           + (", int8 weights" if args.quantize == "int8" else ""))
  return Service(inf, label=label, prompts=example_prompts(inf.tokenizer))


def example_prompts(tokenizer) -> dict[str, str]:
  """Upstream's example prompts, or the shapes demo's when the tokenizer cannot read those."""
  from bagel_jax.app.service import PROMPTS
  from bagel_jax.tokenizer import TokenizerError
  for prompts in (PROMPTS, SHAPES_PROMPTS):
    try:
      for text in prompts.values():
        tokenizer.encode(text)
      return prompts
    except TokenizerError:
      continue
  return {}


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    import gradio  # noqa: F401
  except ImportError:
    print("error: the web app needs gradio: pip install -e '.[app]'", file=sys.stderr)
    return 2
  from bagel_jax.app import ui
  from bagel_jax.config import ConfigError
  from bagel_jax.inference.errors import InferenceError
  from bagel_jax.tokenizer import TokenizerError
  from bagel_jax.train.config import TrainConfigError
  from bagel_jax.weights.errors import CheckpointError

  t0 = time.time()
  try:
    service = load_service(args)
  except (CheckpointError, ConfigError, InferenceError, TokenizerError, TrainConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"loaded {args.checkpoint} in {time.time() - t0:.1f}s", file=sys.stderr)
  demo = ui.build(service, title=f"BAGEL: {pathlib.PurePath(str(args.checkpoint)).name}")
  try:
    demo.launch(server_name=args.server_name, server_port=args.server_port, share=args.share,
                inbrowser=args.inbrowser, css=ui.CSS, show_error=True, max_file_size="50mb")
  except OSError as e:  # the port is taken, or the address cannot be bound
    print(f"error: cannot serve on {args.server_name}:{args.server_port} ({e})", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
