"""Text-to-image and image editing from the command line.

    python -m bagel_jax.inference.generate --checkpoint DIR --prompt "a red cat" --size 1024x1024 --out cat.png
    python -m bagel_jax.inference.generate --checkpoint DIR --image in.png --prompt "make it night" --out night.png
    python -m bagel_jax.inference.generate --checkpoint DIR --prompt "..." --think --out out.png   # prints the plan

An --image makes it an edit (the output has the input's size after upstream's resize).  Defaults
are upstream's notebook settings: text-to-image cfg_text 4.0, cfg_img 1.0, interval 0.4..1.0,
global renorm; editing cfg_text 4.0, cfg_img 2.0, interval 0.0..1.0, text_channel renorm;
50 timesteps (49 Euler steps), shift 3.0.  --quantize int8 stores the decoder weights in int8.
--enable-taylorseer turns on upstream's TaylorSeer step caching (docs/taylorseer.md).
"""

from __future__ import annotations

import argparse
import sys
import time


def _size(text: str) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--size must be HxW, e.g. 1024x1024; got {text!r}") from None
  return h, w


def _interval(text: str) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--cfg-interval must be LOW,HIGH; got {text!r}") from None
  return lo, hi


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bagel_jax.inference.generate", description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="upstream release folder (configs, ema/ae safetensors, tokenizer.json), a folder converted to Orbax, or a Hugging Face repo id (ByteDance-Seed/BAGEL-7B-MoT)")
  p.add_argument("--prompt", required=True)
  p.add_argument("--image", action="append", default=[], help="input image(s): makes it an edit")
  p.add_argument("--out", required=True, help="output PNG")
  p.add_argument("--think", action="store_true", help="generate a plan first (printed), then the image")
  p.add_argument("--size", type=_size, default=(1024, 1024), help="HxW for text-to-image (default 1024x1024)")
  p.add_argument("--steps", type=int, default=50, help="num_timesteps (gives steps - 1 Euler steps; default 50)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cfg-text-scale", type=float, default=4.0)
  p.add_argument("--cfg-img-scale", type=float, default=None, help="default 1.0 (text-to-image), 2.0 (edit)")
  p.add_argument("--cfg-interval", type=_interval, default=None, help="LOW,HIGH; default 0.4,1.0 (t2i), 0.0,1.0 (edit)")
  p.add_argument("--cfg-renorm-type", choices=("global", "channel", "text_channel"), default=None,
                 help="default global (t2i), text_channel (edit)")
  p.add_argument("--cfg-renorm-min", type=float, default=0.0)
  p.add_argument("--timestep-shift", type=float, default=3.0)
  p.add_argument("--max-think-tokens", type=int, default=1000)
  p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: CHECKPOINT/tokenizer.json)")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                 help="default bfloat16 on a GPU/TPU, float32 on CPU")
  p.add_argument("--quantize", choices=("none", "int8"), default="none")
  p.add_argument("--attention", default="auto", help="attention backend (auto, reference, xla_chunked, ...)")
  p.add_argument("--no-progress", action="store_true")
  g = p.add_argument_group("TaylorSeer step caching (upstream's enable_taylorseer; see bagel_jax.inference.taylorseer)")
  g.add_argument("--enable-taylorseer", action="store_true", help="forecast the LLM on some denoising steps")
  g.add_argument("--fresh-threshold", type=int, default=3, help="after the first calls, every N-th call is full (default 3)")
  g.add_argument("--max-order", type=int, default=6, help="highest Taylor order (default 6)")
  g.add_argument("--first-enhance", type=int, default=5, help="the first N calls are full (default 5)")
  g.add_argument("--taylorseer-mode", choices=("upstream", "flow_time", "velocity"), default="upstream",
                 help="upstream (default), or this port's variants: differences in flow time, or caching the velocity")
  g.add_argument("--fresh-tolerance", type=float, default=0.0,
                 help="adaptive refresh: the interval adapts to the measured forecast error (0: off)")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  from bagel_jax.inference import cli_checks
  return cli_checks.reported(lambda: _generate(args))


def _generate(args) -> int:
  import jax.numpy as jnp

  from bagel_jax.inference import InferenceError, Inferencer, load_image, taylorseer
  from bagel_jax.inference.cli_checks import checkpoint_folder, output_path, save_png
  from bagel_jax.inference.inferencer import check_image_size

  edit = bool(args.image)
  # Everything a request can get wrong is checked before the weights are read.
  if args.steps < 2:
    raise InferenceError(f"--steps must be at least 2 (it gives steps - 1 Euler steps); got {args.steps}")
  taylorseer.from_options(args.enable_taylorseer, fresh_threshold=args.fresh_threshold, max_order=args.max_order,
                          first_enhance=args.first_enhance, taylorseer_mode=args.taylorseer_mode,
                          fresh_tolerance=args.fresh_tolerance)
  out = output_path(args.out)
  images = [load_image(p) for p in args.image]
  size_check = (lambda cfg: None) if edit else (lambda cfg: check_image_size(cfg, args.size, "--size"))
  folder = checkpoint_folder(args.checkpoint, size_check, need_tokenizer=args.tokenizer is None)  # a repo id: here
  t0 = time.time()
  inf = Inferencer.from_checkpoint(folder, tokenizer=args.tokenizer, quantize=args.quantize,
                                   dtype=None if args.dtype is None else getattr(jnp, args.dtype),
                                   attention_impl=args.attention)
  print(f"loaded {args.checkpoint} in {time.time() - t0:.1f}s", file=sys.stderr)
  t0 = time.time()
  outs = inf.interleave_inference(
      images + [args.prompt], think=args.think, max_think_token_n=args.max_think_tokens,
      cfg_text_scale=args.cfg_text_scale,
      cfg_img_scale=args.cfg_img_scale if args.cfg_img_scale is not None else (2.0 if edit else 1.0),
      cfg_interval=args.cfg_interval or ((0.0, 1.0) if edit else (0.4, 1.0)),
      cfg_renorm_type=args.cfg_renorm_type or ("text_channel" if edit else "global"),
      cfg_renorm_min=args.cfg_renorm_min, timestep_shift=args.timestep_shift, num_timesteps=args.steps,
      image_shapes=args.size, seed=args.seed, progress=not args.no_progress,
      enable_taylorseer=args.enable_taylorseer, fresh_threshold=args.fresh_threshold, max_order=args.max_order,
      first_enhance=args.first_enhance, taylorseer_mode=args.taylorseer_mode, fresh_tolerance=args.fresh_tolerance)
  for o in outs:
    if isinstance(o, str):
      print(o)
    else:
      save_png(o, out)
      print(f"wrote {out} ({o.size[1]}x{o.size[0]}) in {time.time() - t0:.1f}s", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
