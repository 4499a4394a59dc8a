"""`python -m bagel_jax`: a float32 forward pass of the tiny BAGEL on the bundled fixture.

Loads the upstream-format checkpoint folder, packs its training example (text, a ViT
image, a noisy and a clean VAE image), runs the MoT forward and both losses, and
prints what it computed next to upstream's recorded values.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import numpy as np

from bagel_jax.api import BagelModel
from bagel_jax.config import load_config
from bagel_jax.demo import REPO_FIXTURE, fixture_batch, load_cases


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", type=pathlib.Path, default=REPO_FIXTURE,
                  help="an upstream-format folder with cases.npz (default: the bundled tiny fixture)")
  ap.add_argument("--attention", default="auto", help="attention backend")
  args = ap.parse_args(argv)

  cfg = load_config(args.checkpoint)
  model = BagelModel(cfg, attention_impl=args.attention)
  t0 = time.perf_counter()
  params = model.load_upstream(args.checkpoint)
  cases = load_cases(args.checkpoint)
  batch, _ = fixture_batch(args.checkpoint, cases, model, params)
  out = jax.jit(model.forward)(params, batch)
  _, parts = jax.jit(model.loss)(params, batch)
  jax.block_until_ready(parts.total)
  n = model.num_params()
  lay = batch.layout
  print(f"checkpoint   {args.checkpoint}")
  print(f"model        LLM {cfg.llm.num_hidden_layers}x{cfg.llm.hidden_size} MoT, ViT {cfg.vit.num_hidden_layers}x"
        f"{cfg.vit.hidden_size}, VAE ch {cfg.vae.ch}; params bagel={n['bagel']:,} vae={n['vae']:,}")
  print(f"sequence     {lay.length} tokens: {int((lay.token_kind == 1).sum())} text, "
        f"{int((lay.token_kind == 2).sum())} ViT, {int((lay.token_kind == 3).sum())} VAE "
        f"({int(lay.vae_noisy.sum())} noisy); {int(parts.num_ce)} CE targets")
  print(f"ce loss      {float(parts.ce):.6f}  (upstream {float(cases['train/ce_loss']):.6f})")
  print(f"mse loss     {float(parts.mse):.6f}  (upstream {float(cases['train/mse_loss']):.6f})")
  print(f"hidden       rel. error vs upstream {_rel(out.hidden[0], cases['train/hidden']):.2e}")
  print(f"ce logits    rel. error vs upstream {_rel(out.ce_logits[0], cases['train/ce_logits']):.2e}")
  print(f"done in {time.perf_counter() - t0:.1f}s on {jax.devices()[0].platform}")


if __name__ == "__main__":
  main()
