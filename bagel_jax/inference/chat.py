"""Image understanding from the command line.

    python -m bagel_jax.inference.chat --checkpoint DIR --image photo.png --question "What is in this image?"

Greedy by default (upstream's notebook); --sample draws with --temperature (0.3), --top-k, --top-p.
--think opens the context with upstream's reasoning system prompt.  Several --image are allowed;
--video CLIP adds a clip as one video input (--frames frames, the middle one of equal intervals).
"""

from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bagel_jax.inference.chat", description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="upstream release folder, a folder converted to Orbax, or a Hugging Face repo id")
  p.add_argument("--image", action="append", default=[], help="input image(s)")
  p.add_argument("--video", action="append", default=[], help="input video clip(s), after the images")
  p.add_argument("--frames", type=int, default=8, help="frames sampled from each --video clip")
  p.add_argument("--question", required=True)
  p.add_argument("--think", action="store_true")
  p.add_argument("--max-tokens", type=int, default=512, help="token limit, <|im_start|> included (upstream's max_length)")
  p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
  p.add_argument("--temperature", type=float, default=0.3)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: CHECKPOINT/tokenizer.json)")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
  p.add_argument("--quantize", choices=("none", "int8"), default="none")
  p.add_argument("--attention", default="auto")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  from bagel_jax.inference import cli_checks
  return cli_checks.reported(lambda: _chat(args))


def _chat(args) -> int:
  import jax.numpy as jnp

  from bagel_jax.inference import Inferencer, load_image, load_video
  from bagel_jax.inference.cli_checks import checkpoint_folder

  images = [load_image(p) for p in args.image] + [load_video(v, args.frames) for v in args.video]
  folder = checkpoint_folder(args.checkpoint, need_tokenizer=args.tokenizer is None)  # a repo id: resolved here
  inf = Inferencer.from_checkpoint(folder, tokenizer=args.tokenizer, quantize=args.quantize,
                                   dtype=None if args.dtype is None else getattr(jnp, args.dtype),
                                   attention_impl=args.attention)
  [answer] = inf.interleave_inference(images + [args.question], understanding_output=True, think=args.think,
                                      max_think_token_n=args.max_tokens, do_sample=args.sample,
                                      text_temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      seed=args.seed)
  print(answer)
  return 0


if __name__ == "__main__":
  sys.exit(main())
