"""Train-step benchmark: `python -m bagel_jax.bench train [--attention IMPL[,IMPL...]] [--reps N] [--out FILE]`.

Builds the workload of issue 13: a 12.4M-parameter BAGEL-MoT (LLM hidden 256, 6 layers, 4 query /
2 KV heads of 64, MLP 768, vocab 2048; ViT 192 wide x 3 layers; FLUX VAE with ch 32) and one
packed row of 738 tokens holding a text-to-image, an understanding, an editing and a second
understanding sample (224 ViT tokens, three 128 px VAE images = 192 latent tokens, 182 CE tokens).
For each attention backend it compiles the full jitted `train_step` and its parts, then times
`--reps` interleaved repetitions (medians) of:

  vae      VAE posterior sample of the three images + timesteps and noise (`flow_batch`)
  forward  embeddings + MoT decoder + CE/MSE loss (`model.loss`)
  backward value_and_grad minus forward
  update   gradient clip + AdamW + EMA on given gradients
  step     the whole jitted `train_step` (what the trainer runs)

plus compile time of the step, peak RSS of the process and tokens/s (738 / step).  Prints a table
and one JSON object (also written to --out).  Pin the process (`taskset -c 0`) to measure one core.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import time

ROW_TOKENS = 738
PHASES = ("vae", "forward", "backward", "update", "step")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bagel_jax.bench train", description=__doc__.splitlines()[0])
  p.add_argument("--attention", default="auto",
                 help="comma-separated variants IMPL[:unroll] (an attention backend; ':unroll' = model.unroll_layers), "
                      "timed interleaved")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--no-parts", action="store_true", help="time only the whole step (half the compile time)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="also write the JSON here")
  return p


def workload_config():
  from bagel_jax.config import BagelConfig, LLMConfig, SpecialTokens, VAEConfig, ViTConfig
  return BagelConfig(
      llm=LLMConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2),
      vit=ViTConfig(hidden_size=192, intermediate_size=768, num_attention_heads=3, num_hidden_layers=3),
      vae=VAEConfig(ch=32),
      tokens=SpecialTokens(bos_token_id=2040, eos_token_id=2041, start_of_image=2042, end_of_image=2043),
      max_latent_size=16, vit_max_num_patch_per_side=16)


def workload_plans(rng):
  """The row's four samples: t2i (prompt + noisy 8x8 latents), vlm, edit (clean VAE + ViT input,
  instruction, noisy target), vlm."""
  from bagel_jax import layout as L
  ids = lambda n: rng.integers(0, 2000, n).tolist()
  t2i = [L.Text(ids(30)), L.VaeImage((8, 8), loss=True)]
  vlm1 = [L.VitImage((8, 10)), L.Text(ids(30)), L.Text(ids(90), loss=True)]
  edit = [L.VaeImage((8, 8)), L.VitImage((8, 8)), L.Text(ids(29)), L.VaeImage((8, 8), loss=True)]
  vlm2 = [L.VitImage((10, 8)), L.Text(ids(29)), L.Text(ids(90), loss=True)]
  return [t2i, vlm1, edit, vlm2]


def workload_batch(cfg, seed: int = 0):
  """One packed row of 738 tokens as a TrainBatch (host numpy arrays)."""
  import numpy as np

  from bagel_jax import layout as L
  from bagel_jax.train.step import TrainBatch
  rng = np.random.default_rng(seed)
  lay = L.pack([workload_plans(rng)], L.Capacity(tokens=ROW_TOKENS), cfg.tokens, **L.position_args(cfg))
  side = 8 * cfg.latent_downsample
  images = rng.uniform(-1, 1, (1, 3, side, side, 3)).astype(np.float32)
  vit = rng.uniform(-1, 1, (1, lay.vit_indexes.shape[1], cfg.vit.patch_dim)).astype(np.float32)
  return TrainBatch(layout=lay, vit_patches=vit, vae_images=images)


def workload_tx():
  """Upstream's optimizer: clip 1.0, AdamW (0.9, 0.95)."""
  import optax
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-15))


def _parts(model, tx, hp, state, vae, batch) -> dict:
  """Compiled phase functions (each: () -> outputs) for one model."""
  import jax

  from bagel_jax.train import step as ts
  rng = jax.random.key(3)
  flow = jax.jit(lambda v, b, r: ts.flow_batch(model, hp, v, b, r))
  mb = jax.block_until_ready(flow(vae, batch, rng))

  def loss(p, mb):
    return model.loss({"bagel": p, "vae": vae}, mb, hp.ce_weight, hp.mse_weight)[0]

  fwd = jax.jit(loss)
  vg = jax.jit(jax.value_and_grad(loss))
  grads = jax.block_until_ready(vg(state.params, mb)[1])

  def update(state, grads):
    updates, opt = tx.update(grads, state.opt_state, state.params)
    import optax
    params = optax.apply_updates(state.params, updates)
    d = hp.ema_decay
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema, params)
    return params, opt, ema

  upd = jax.jit(update)
  compiled = {"vae": flow.lower(vae, batch, rng).compile(), "forward": fwd.lower(state.params, mb).compile(),
              "grad": vg.lower(state.params, mb).compile(), "update": upd.lower(state, grads).compile()}
  return {"vae": lambda: compiled["vae"](vae, batch, rng), "forward": lambda: compiled["forward"](state.params, mb),
          "grad": lambda: compiled["grad"](state.params, mb), "update": lambda: compiled["update"](state, grads)}


def parse_variant(variant: str) -> tuple[str, bool]:
  """"IMPL" or "IMPL:unroll" -> (attention backend, unroll_layers); ValueError on anything else."""
  impl, _, opt = variant.strip().partition(":")
  if opt not in ("", "unroll"):
    raise ValueError(f"--attention: {variant.strip()!r}: the only option after ':' is 'unroll'")
  return impl, opt == "unroll"


def _setup(variant: str, args, cfg, batch) -> dict:
  import jax

  from bagel_jax.api import BagelModel
  from bagel_jax.train import step as ts
  impl, unroll = parse_variant(variant)
  model = BagelModel(cfg, attention_impl=impl, unroll_layers=unroll)
  params = model.init(jax.random.key(args.seed))
  tx = workload_tx()
  hp = ts.StepConfig(ema_decay=0.9999)
  state = ts.init_train_state(params["bagel"], tx, jax.random.key(args.seed + 1), True)
  t0 = time.perf_counter()
  step = jax.jit(functools.partial(ts.train_step, model, tx, hp)).lower(state, params["vae"], batch).compile()
  compile_s = time.perf_counter() - t0
  fns = {"step": lambda: step(state, params["vae"], batch)}
  if not args.no_parts:
    fns.update(_parts(model, tx, hp, state, params["vae"], batch))
  first = jax.device_get(fns["step"]()[1])
  return {"fns": fns, "compile_s": compile_s, "loss": float(first["loss"]), "grad_norm": float(first["grad_norm"])}


def _time(fn) -> float:
  import jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def run(args) -> dict:
  import jax
  import numpy as np

  impls = [s.strip() for s in args.attention.split(",") if s.strip()]
  cfg = workload_config()
  batch = workload_batch(cfg, args.seed)
  runs = {impl: _setup(impl, args, cfg, batch) for impl in impls}
  times: dict = {impl: {k: [] for k in runs[impl]["fns"]} for impl in impls}
  for _ in range(args.reps):  # interleaved: load changes hit every backend alike
    for impl in impls:
      for name, fn in runs[impl]["fns"].items():
        times[impl][name].append(_time(fn))
  out = {"workload": {"tokens": ROW_TOKENS, "vit_tokens": int(batch.layout.vit_indexes.shape[1]),
                      "vae_images": 3, "ce_tokens": int((np.asarray(batch.layout.ce_weights) > 0).sum()),
                      "params": sum(x.size for x in jax.tree.leaves(jax.eval_shape(
                          lambda: __import__("bagel_jax.api", fromlist=["BagelModel"]).BagelModel(cfg).init(
                              jax.random.key(0))["bagel"])))},
         "reps": args.reps, "device": jax.devices()[0].device_kind, "results": {}}
  for impl in impls:
    med = {k: float(np.median(v)) for k, v in times[impl].items()}
    r = {"step_s": med["step"], "compile_s": runs[impl]["compile_s"], "tokens_per_s": ROW_TOKENS / med["step"],
         "loss": runs[impl]["loss"], "grad_norm": runs[impl]["grad_norm"]}
    if "grad" in med:
      r.update(vae_s=med["vae"], forward_s=med["forward"], backward_s=med["grad"] - med["forward"],
               update_s=med["update"])
    out["results"][impl] = r
  out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return out


def table(out: dict) -> str:
  cols = ("vae_s", "forward_s", "backward_s", "update_s", "step_s", "compile_s", "tokens_per_s")
  lines = ["| attention | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for impl, r in out["results"].items():
    cells = [f"{r[c]:.3f}" if c in r and c != "tokens_per_s" else (f"{r[c]:.0f}" if c in r else "-") for c in cols]
    lines.append(f"| {impl} | " + " | ".join(cells) + " |")
  lines.append(f"peak RSS {out['peak_rss_mb']:.0f} MB (whole process, all backends)")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  if args.reps < 1:
    print("--reps must be at least 1", file=sys.stderr)
    return 2
  from bagel_jax.attention import IMPLS
  for variant in args.attention.split(","):
    try:
      impl, _ = parse_variant(variant)
    except ValueError as e:
      print(e, file=sys.stderr)
      return 2
    if impl not in IMPLS:
      print(f"--attention: unknown backend {impl!r}; expected one of {', '.join(IMPLS)}", file=sys.stderr)
      return 2
  out = run(args)
  print(table(out))
  text = json.dumps(out, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return 0
