"""The packed training example recorded in a parity fixture folder (`cases.npz`, key prefix train/).

Used by `python -m bagel_jax` (a forward pass of the tiny model) and by the parity tests.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import layout as L
from bagel_jax.api import BagelModel, Params
from bagel_jax.model.bagel import Batch

REPO_FIXTURE = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "bagel_tiny_a"


def fixture_plan(folder: pathlib.Path, cases: dict[str, np.ndarray], model: BagelModel) -> list[L.Item]:
  """The fixture's one-sample plan (cases.json "train.plan"), with text ids from cases.npz."""
  cfg = model.cfg
  spec = json.loads((folder / "cases.json").read_text())["train"]["plan"][0]
  ids = cases["train/text_ids"].tolist()
  lat = iter(tuple(int(v) for v in s) for s in cases["train/latent_shapes"])
  vit_pos = cases["train/vit_position_ids"]
  side = cfg.vit_max_num_patch_per_side
  vit_grid = (int(vit_pos.max()) // side + 1, int(vit_pos.max()) % side + 1)
  named = {"start_of_image": cfg.tokens.start_of_image, "end_of_image": cfg.tokens.end_of_image}
  plan, ptr = [], 0
  for kind, arg, opts in spec:
    if kind == "text":
      plan.append(L.Text(ids[ptr + 1:ptr + 1 + arg], loss=bool(opts.get("loss")),
                         special_token_loss=bool(opts.get("special_token_loss")),
                         special_token_label=named.get(opts.get("special_token_label"))))
      ptr += arg + 2
    elif kind == "vit_image":
      plan.append(L.VitImage(vit_grid))
      ptr += 2
    elif kind == "vae_image":
      plan.append(L.VaeImage(next(lat), loss=bool(opts.get("loss"))))
      ptr += 2
    else:
      raise ValueError(f"{folder / 'cases.json'}: unknown plan item {kind!r}")
  return plan


def fixture_batch(folder: pathlib.Path, cases: dict[str, np.ndarray], model: BagelModel, params: Params) -> tuple[Batch, jax.Array]:
  """The fixture's training batch, with latents encoded from its padded images and recorded eps."""
  cfg = model.cfg
  plan = fixture_plan(folder, cases, model)
  n = int(cases["train/sequence_length"][0])
  lay = L.pack([[plan]], L.Capacity(tokens=n), cfg.tokens, **L.position_args(cfg))
  lay = jax.tree.map(jnp.asarray, lay)
  images = jnp.asarray(cases["train/vae_padded_images"]).transpose(0, 2, 3, 1)
  eps = jnp.asarray(cases["train/vae_eps"]).transpose(0, 2, 3, 1)
  mean, logvar = jnp.split(model.encode_moments(params, images), 2, axis=-1)
  latents = cfg.vae.scale_factor * (mean + jnp.exp(0.5 * logvar) * eps - cfg.vae.shift_factor)
  batch = Batch(layout=lay, vit_patches=jnp.asarray(cases["train/vit_tokens"])[None],
                vae_latents=model.latent_tokens(latents[None], lay),
                noise=jnp.asarray(cases["train/noise"])[None],
                timesteps=jnp.asarray(cases["train/timesteps"])[None])
  return batch, latents


def load_cases(folder: pathlib.Path = REPO_FIXTURE) -> dict[str, np.ndarray]:
  with np.load(folder / "cases.npz") as d:
    return {k: d[k] for k in d.files}
