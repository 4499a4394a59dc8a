"""One training step's gradients agree with central finite differences of the loss it minimises.

The step runs with `optax.sgd(1.0)`, so `params - new_params` is exactly the gradient the step
applied (after the frozen-table mask). The finite differences re-evaluate the same loss: the same
VAE posterior draw, timesteps and noise (`train_step.flow_batch` with the step's RNG split).
The batch packs a text-to-image, a question-answering and an editing sample through the data
packer, so every trainable part (both MoT experts, ViT, connector, heads) gets a gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bagel_jax import layout as L
from bagel_jax.train import step as ts
from bagel_jax.api import BagelModel
from bagel_jax.config import bagel_tiny
from bagel_jax.data.packing import PackSpec, assemble
from bagel_jax.data.samples import Sample

CHECKED = [  # (leaf, expert index or None): the entry with the largest gradient is checked
    ("llm/layers/q_proj/kernel", 0), ("llm/layers/q_proj/kernel", 1), ("llm/layers/down_proj/kernel", 1),
    ("llm/layers/v_proj/bias", 0), ("llm/norm", None), ("llm/embed_tokens", None), ("llm/lm_head", None),
    ("vit/layers/fc1/kernel", None), ("vit/patch_embedding/kernel", None), ("connector/fc2/kernel", None),
    ("vae2llm/kernel", None), ("llm2vae/kernel", None), ("time_embedder/mlp_in/kernel", None),
]


def _batch(cfg, rng):
  v = 400
  ids = lambda n: rng.integers(0, v, n).tolist()
  img = lambda h, w: rng.uniform(-1, 1, (h, w, 3)).astype(np.float32)
  t2i = Sample([L.Text(ids(4)), L.VaeImage((2, 3), loss=True)], vit=[], vae=[img(16, 24)])
  vqa = Sample([L.VitImage((2, 2)), L.Text(ids(3)), L.Text(ids(2), loss=True)], vit=[img(28, 28)], vae=[])
  edit = Sample([L.VaeImage((2, 2)), L.VitImage((2, 2)), L.Text(ids(3)), L.VaeImage((2, 2), loss=True)],
                vit=[img(28, 28)], vae=[img(16, 16), img(16, 16)])
  spec = PackSpec(rows=2, capacity=L.Capacity(tokens=48, vit=8, vae=16, ce=8, vae_images=3), expected_tokens=48,
                  vae_side=24, vit_patch=14, vit_channels=3, latent_downsample=8, tokens=cfg.tokens,
                  max_patches_per_side=cfg.vit_max_num_patch_per_side, max_latent_size=cfg.max_latent_size)
  a = assemble([[t2i, vqa], [edit]], spec)
  return ts.TrainBatch(layout=a["layout"], vit_patches=a["vit_patches"], vae_images=a["vae_images"])


def test_step_gradients_match_finite_differences():
  cfg = bagel_tiny()
  model = BagelModel(cfg, attention_impl="reference")
  params = model.init(jax.random.key(0))
  # llm2vae is zero-initialised (as upstream); give it weights so the MSE reaches the LLM.
  k = params["bagel"]["llm2vae"]["kernel"]
  params["bagel"]["llm2vae"]["kernel"] = 0.05 * jax.random.normal(jax.random.key(1), k.shape)
  batch = _batch(cfg, np.random.default_rng(0))
  tx = optax.sgd(1.0)
  hp = ts.StepConfig()
  state = ts.init_train_state(params["bagel"], tx, jax.random.key(2), ema=False)
  new_state, metrics = jax.jit(functools.partial(ts.train_step, model, tx, hp))(state, params["vae"], batch)
  applied = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                         state.params, new_state.params)

  _, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
  mb = ts.flow_batch(model, hp, params["vae"], batch, step_rng)
  loss = jax.jit(lambda p: model.loss({"bagel": p, "vae": params["vae"]}, mb)[0])
  base = state.params
  np.testing.assert_allclose(float(loss(base)), float(metrics["loss"]), rtol=1e-6)

  def get(tree, path):
    for part in path.split("/"):
      tree = tree[part]
    return tree

  def set_(tree, path, value):
    tree = jax.tree.map(lambda x: x, tree)
    node = tree
    parts = path.split("/")
    for part in parts[:-1]:
      node = node[part]
    node[parts[-1]] = value
    return tree

  for path, expert in CHECKED:
    g = get(applied, path)
    view = np.abs(g)
    if expert is not None:  # stacked MoT weights: [layer, expert, ...]
      mask = np.zeros_like(view)
      mask[:, expert] = 1
      view = view * mask
    idx = np.unravel_index(np.argmax(view), g.shape)
    assert view[idx] > 1e-4, (path, expert, "no gradient")
    x = np.asarray(get(base, path))
    h = 1e-2 * max(1.0, abs(float(x[idx])))
    fd = []
    for sign in (1, -1):
      y = x.copy()
      y[idx] += sign * h
      fd.append(float(loss(set_(base, path, jnp.asarray(y)))))
    numeric = (fd[0] - fd[1]) / (2 * h)
    np.testing.assert_allclose(g[idx], numeric, rtol=3e-2, atol=2e-4, err_msg=f"{path} {idx}")

  # The fixed sin-cos tables are frozen: zero update.
  for path in ("latent_pos_embed", "vit_pos_embed"):
    assert not np.any(get(applied, path))


def test_unrolled_layers_give_the_scanned_gradients():
  """model.unroll_layers changes how the layers are compiled, not what the loss and gradients are."""
  cfg = bagel_tiny()
  batch, hp = _batch(cfg, np.random.default_rng(1)), ts.StepConfig()
  model = BagelModel(cfg, attention_impl="reference")
  params = model.init(jax.random.key(0))
  mb = ts.flow_batch(model, hp, params["vae"], batch, jax.random.key(3))
  out = []
  for unroll in (False, True):
    m = dataclasses.replace(model, unroll_layers=unroll)
    out.append(jax.jit(jax.value_and_grad(lambda p: m.loss({"bagel": p, "vae": params["vae"]}, mb)[0]))(
        params["bagel"]))
  (l0, g0), (l1, g1) = out
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g0))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * scale)
