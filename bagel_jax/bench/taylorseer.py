"""TaylorSeer benchmark: `python -m bagel_jax.bench taylorseer [--config tiny|random] [--steps 50] [--variants ...]`.

One text-to-image request with upstream's notebook settings (cfg_text 4.0, interval 0.4..1.0,
global renorm, shift 3.0), sampled uncached and with each cache variant from the same noise.
Per variant: full LLM branch forwards (summed over the CFG branches; the uncached run's count is
every branch call), denoising time (the fastest of --repeat compiled runs) and the speed-up over
the uncached run measured in the same process, the final latent's relative error against the uncached run,
and the decoded image's PSNR / max uint8 difference against the uncached image.  `--config tiny`
is the bundled fixture model, `random` a larger model with random weights (8 layers, hidden 384,
128x128 images).  `--config shapes --workdir RUN` loads the shapes demo's latest checkpoint (from a
copy of the files it needs; the run folder is only read) and adds the demo evaluator's generation
accuracy on the held-out captions, all sampled at the same number of steps with the evaluator's
settings (text CFG 3.0 at every step, no renorm).  Prints a Markdown table and writes JSON with --out.

A variant is MODE[:FRESH_THRESHOLD[:FRESH_TOLERANCE[:MAX_ORDER]]], MODE one of
bagel_jax.inference.taylorseer.MODES, e.g. `upstream` (upstream's settings), `flow_time:4`,
`flow_time:3:0.01`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

DEFAULT_VARIANTS = ("upstream", "upstream:4", "upstream:5", "flow_time", "flow_time:4", "flow_time:5", "velocity",
                    "flow_time:3:0.003", "flow_time:3:0.01")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bagel_jax.bench taylorseer", description=__doc__.splitlines()[0])
  p.add_argument("--config", choices=("tiny", "random", "shapes"), default="tiny")
  p.add_argument("--workdir", default="runs/shapes", help="the shapes demo's run folder (--config shapes)")
  p.add_argument("--per-combo", type=int, default=8, help="images per held-out caption (--config shapes)")
  p.add_argument("--size", default=None, help="HxW (default: 64x64 tiny, 128x128 random)")
  p.add_argument("--steps", type=int, default=50, help="num_timesteps (steps - 1 Euler steps; default 50)")
  p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
  p.add_argument("--repeat", type=int, default=3, help="timed runs per variant after the compiling one (the fastest counts)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="also write the JSON here")
  return p


def parse_variant(text: str) -> dict:
  """MODE[:FRESH_THRESHOLD[:FRESH_TOLERANCE[:MAX_ORDER]]] -> Inferencer keyword arguments (checked)."""
  from bagel_jax.inference import taylorseer
  from bagel_jax.inference.errors import InferenceError
  parts = text.split(":")
  try:
    kw = dict(taylorseer_mode=parts[0], fresh_threshold=int(parts[1]) if len(parts) > 1 else 3,
              fresh_tolerance=float(parts[2]) if len(parts) > 2 else 0.0,
              max_order=int(parts[3]) if len(parts) > 3 else 6)
  except ValueError:
    raise InferenceError(f"variant {text!r}: expected MODE[:THRESHOLD[:TOLERANCE[:MAX_ORDER]]]") from None
  if len(parts) > 4:
    raise InferenceError(f"variant {text!r}: expected MODE[:THRESHOLD[:TOLERANCE[:MAX_ORDER]]]")
  taylorseer.from_options(True, **kw)
  return dict(kw, enable_taylorseer=True)


def _model(config: str, seed: int):
  import jax
  from bagel_jax.api import BagelModel
  from bagel_jax.config import LLMConfig, bagel_tiny, load_config
  from bagel_jax.inference.quantize import random_params
  fixture = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "bagel_tiny_a"
  if config == "tiny":
    cfg = load_config(fixture)
    model = BagelModel(cfg, attention_impl="reference")
    return model, model.load_upstream(fixture), "bagel_tiny_a fixture (2 layers, hidden 64)"
  llm = LLMConfig(vocab_size=1024, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=6, num_key_value_heads=2)
  cfg = bagel_tiny().replace(llm=llm, max_latent_size=16)
  model = BagelModel(cfg, attention_impl="reference")
  return model, random_params(model, jax.random.key(seed)), "random (8 layers, hidden 384)"


def _shapes_model(workdir: str):
  """The shapes demo's model at its latest checkpoint: (model, EMA params, tokenizer, config, step).

  Reads a copy of config.json, vae_stats.json, vae/ and the latest checkpoints/STEP in a temporary
  folder, so a run still training is never written to."""
  import json
  import shutil
  import tempfile
  from bagel_jax.inference.errors import InferenceError
  from bagel_jax.train import loop
  from bagel_jax.train.config import base_config
  src = pathlib.Path(workdir)
  steps = sorted(int(p.name) for p in (src / "checkpoints").glob("[0-9]*") if p.name.isdigit())  # not *-tmp-*
  if not (src / "config.json").is_file() or not steps:
    raise InferenceError(f"{src}: no shapes-demo checkpoint (config.json and checkpoints/STEP expected)")
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="taylorseer_shapes_"))
  for name in ("config.json", "vae_stats.json"):
    shutil.copy(src / name, tmp / name)
  shutil.copytree(src / "vae", tmp / "vae")
  shutil.copytree(src / "checkpoints" / str(steps[-1]), tmp / "checkpoints" / str(steps[-1]))
  config = base_config()
  config.update(json.loads((tmp / "config.json").read_text()))
  setup = loop.prepare(config, tmp)
  r = loop.build_run(setup)
  params = {"bagel": r.state.ema if r.state.ema is not None else r.state.params, "vae": r.vae_params}
  return r.model, params, setup.tokenizer, config, r.start


def _shapes_scores(images, scenes) -> dict:
  import numpy as np
  from bagel_jax.eval import shapes as shapes_eval
  verdicts = [shapes_eval.judge(shapes_eval.analyse(im), sc) for im, sc in zip(images, scenes)]
  return {k: round(float(np.mean([v[k] for v in verdicts if k in v])), 4)
          for k in ("all", "count", "colour", "shape", "position")}


def run_shapes(args) -> dict:
  """Held-out shapes captions sampled uncached and with each variant from the same noise; the evaluator's accuracy."""
  import numpy as np
  from bagel_jax.data import shapes
  from bagel_jax.inference import Inferencer
  variants = {v: parse_variant(v) for v in args.variants}
  model, params, tok, config, step = _shapes_model(args.workdir)
  ev = config.eval
  scenes = [shapes.scene_from_prompt_key(k) for k in shapes.HELD_OUT_SINGLE + shapes.HELD_OUT_COUNT]
  scenes = [s for s in scenes for _ in range(int(args.per_combo))]
  requests = [[tok.encode(s.caption())] for s in scenes]
  side = int(config.data.vae_max_size)
  kw = dict(num_timesteps=int(ev.num_steps) + 1, timestep_shift=float(ev.timestep_shift),
            cfg_text_scale=float(ev.cfg_scale), cfg_img_scale=1.0, cfg_interval=(0.0, 1.0), cfg_renorm_min=1.0,
            image_shapes=(side, side), seed=args.seed, output="array")
  inf = Inferencer(model, params, None)
  rows = []
  base = None
  for name, extra in {"uncached": {}, **variants}.items():
    out = inf.batch(requests, record=True, **kw, **extra)
    g = inf.last["groups"][0]
    latent = g["final_latent"]
    base = latent if base is None else base
    full = _full_forwards(g) // len(scenes)
    err = float(np.linalg.norm(latent - base) / np.linalg.norm(base))
    rows.append(dict(variant=name, full_forwards=full, latent_rel_err=float(f"{err:.3e}"),
                     **{f"gen_{k}_accuracy": v for k, v in _shapes_scores([o[0] for o in out], scenes).items()}))
  return dict(config="shapes", weights=f"{args.workdir} step {step} (EMA)", size=f"{side}x{side}",
              num_timesteps=kw["num_timesteps"], images=len(scenes),
              cfg=f"text {ev.cfg_scale} at every step, no renorm, shift {ev.timestep_shift}", rows=rows)


def _full_forwards(g) -> int:
  """Full LLM branch forwards of a recorded sampler run (per image row: counted per branch and request)."""
  import numpy as np
  b = g["final_latent"].shape[0]
  if g["taylor"] is None:  # every branch call is a full forward
    _, _, on = g["schedule"]
    return b * (len(on) + int(np.sum(on)) * (g["raw"].shape[1] // b - 1))
  return b * int(np.sum(g["taylor"][0] == 1))


def _sample(inf, prompt, kw, extra, repeat: int) -> dict:
  """One compiling run, then `repeat` timed ones: the last one's latent and image, the fastest denoising time."""
  times = []
  for _ in range(1 + repeat):
    [img] = inf.batch([[prompt]], record=True, **kw, **extra)[0]
    times.append(inf.timing["denoise_s"])
  g = inf.last["groups"][0]
  return dict(latent=g["final_latent"], image=img, seconds=min(times[1:]), full=_full_forwards(g))


def _psnr(a, b) -> float:
  import numpy as np
  mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
  return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run(args) -> dict:
  import numpy as np
  from bagel_jax.inference import Inferencer
  variants = {v: parse_variant(v) for v in args.variants}
  model, params, weights = _model(args.config, args.seed)
  cfg = model.cfg
  size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else ((64, 64) if args.config == "tiny" else (128, 128))
  inf = Inferencer(model, params, None)
  prompt = np.random.default_rng(args.seed).integers(0, min(cfg.llm.vocab_size, 500), 16).tolist()
  kw = dict(num_timesteps=args.steps, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.0,
            cfg_interval=(0.4, 1.0), cfg_renorm_type="global", image_shapes=size, seed=args.seed, output="array")
  base = _sample(inf, prompt, kw, {}, args.repeat)
  rows = [dict(variant="uncached", full_forwards=base["full"], denoise_s=round(base["seconds"], 4), speedup=1.0,
               latent_rel_err=0.0, image_psnr_db=float("inf"), image_max_abs=0)]
  for name, extra in variants.items():
    r = _sample(inf, prompt, kw, extra, args.repeat)
    err = float(np.linalg.norm(r["latent"] - base["latent"]) / np.linalg.norm(base["latent"]))
    rows.append(dict(variant=name, full_forwards=r["full"], denoise_s=round(r["seconds"], 4),
                     speedup=round(base["seconds"] / r["seconds"], 2), latent_rel_err=float(f"{err:.3e}"),
                     image_psnr_db=round(_psnr(r["image"], base["image"]), 2),
                     image_max_abs=int(np.abs(r["image"].astype(int) - base["image"]).max())))
  return dict(config=args.config, weights=weights, size=f"{size[0]}x{size[1]}", num_timesteps=args.steps,
              cfg="text 4.0, interval (0.4, 1.0], global renorm, shift 3.0", rows=rows)


def shapes_table(res: dict) -> str:
  keys = ("all", "count", "colour", "shape", "position")
  lines = ["| variant | full branch forwards per image | final latent rel. err | " + " | ".join(f"gen {k}" for k in keys) + " |",
           "|" + "---|" * (3 + len(keys))]
  for r in res["rows"]:
    lines.append(f"| {r['variant']} | {r['full_forwards']} | {r['latent_rel_err']:.2e} | "
                 + " | ".join(str(r[f"gen_{k}_accuracy"]) for k in keys) + " |")
  return "\n".join(lines)


def table(res: dict) -> str:
  head = "| variant | full branch forwards | denoise s | speed-up | final latent rel. err | image PSNR dB | max uint8 diff |"
  lines = [head, "|" + "---|" * 7]
  for r in res["rows"]:
    lines.append(f"| {r['variant']} | {r['full_forwards']} | {r['denoise_s']} | {r['speedup']} | {r['latent_rel_err']:.2e} "
                 f"| {r['image_psnr_db']} | {r['image_max_abs']} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  from bagel_jax.inference import InferenceError
  try:
    res = run_shapes(args) if args.config == "shapes" else run(args)
  except InferenceError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{res['weights']}, {res['size']}, {res['num_timesteps']} timesteps, {res['cfg']}")
  print(shapes_table(res) if args.config == "shapes" else table(res))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
