"""Small synthetic training batches for the train-step, sharding and multi-process tests."""

from __future__ import annotations

import numpy as np
import optax

from bagel_jax import layout as L
from bagel_jax.config import BagelConfig
from bagel_jax.train.step import TrainBatch

TOKENS = 96
VAE_IMAGES = 3
VIT = 24


def _row_plans(rng: np.random.Generator, cfg: BagelConfig):
  v = cfg.llm.vocab_size - 16
  ids = lambda n: rng.integers(0, v, n).tolist()
  g = lambda: (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
  und = [L.Text(ids(int(rng.integers(2, 6))), loss=False), L.VitImage(g()), L.Text(ids(int(rng.integers(2, 6))), loss=True)]
  gen = [L.Text(ids(int(rng.integers(2, 5)))), L.VaeImage(g(), loss=True)]
  edit = [L.VaeImage(g(), loss=False), L.Text(ids(3), loss=True), L.VaeImage(g(), loss=True)]
  return [und, gen, edit]


def tiny_batch(cfg: BagelConfig, batch: int, seed: int) -> TrainBatch:
  """`batch` rows, each packing an understanding, a generation and an editing sample."""
  rng = np.random.default_rng(seed)
  rows = [_row_plans(rng, cfg) for _ in range(batch)]
  cap = L.Capacity(tokens=TOKENS, vit=VIT, vae=TOKENS // 2, ce=TOKENS // 2, vae_images=VAE_IMAGES,
                   und=TOKENS, gen=TOKENS // 2)
  lay = L.pack(rows, cap, cfg.tokens, **L.position_args(cfg))
  px = cfg.latent_downsample
  side = 3 * px
  images = np.zeros((batch, VAE_IMAGES, side, side, 3), np.float32)
  grids = np.asarray(lay.vae_image_grid)
  for b in range(batch):
    for i in range(VAE_IMAGES):
      gh, gw = grids[b, i]
      images[b, i, :gh * px, :gw * px] = rng.uniform(-1, 1, (gh * px, gw * px, 3))
  vit = rng.uniform(-1, 1, (batch, VIT, cfg.vit.patch_dim)).astype(np.float32)
  vit = np.where((np.asarray(lay.vit_indexes) < TOKENS)[..., None], vit, 0).astype(np.float32)
  return TrainBatch(layout=lay, vit_patches=vit, vae_images=images)


def tiny_tx() -> optax.GradientTransformation:
  """Upstream's optimizer shape (clip 1.0, AdamW b2 0.95) with a visible learning rate."""
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01))


# ----------------------------------------------------------------------------- cached per process
import functools  # noqa: E402

import jax  # noqa: E402

from bagel_jax.api import BagelModel  # noqa: E402
from bagel_jax.config import bagel_tiny  # noqa: E402
from bagel_jax.train.step import StepConfig, init_train_state, train_step  # noqa: E402

ROWS = 8  # divisible by every batch sharding the tests use (data x fsdp = 4 or 8)
# Tests compile with LLVM's cheap settings: same numbers, ~2.5x less compile time on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_XLA = " ".join(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items())  # the same, for child processes
HP = StepConfig(ema_decay=0.9)


@functools.lru_cache(maxsize=None)
def tiny_model() -> BagelModel:
  return BagelModel(bagel_tiny(), attention_impl="reference")


@functools.lru_cache(maxsize=None)
def tiny_params():
  """{"bagel", "vae"} of the tiny model: the bundled fixture's weights, as host numpy arrays
  (reading them is much cheaper than compiling `init`)."""
  import pathlib
  fixture = pathlib.Path(__file__).parent / "fixtures" / "bagel_tiny_a"
  return jax.tree.map(np.asarray, tiny_model().load_upstream(fixture))


@functools.lru_cache(maxsize=None)
def tx():
  return tiny_tx()


def fresh_state(ema: bool = True):
  """A host (numpy) TrainState: fresh buffers every call, safe to donate."""
  p = tiny_params()["bagel"]
  return jax.tree.map(np.asarray, init_train_state(p, tx(), jax.random.key(1), ema))


@functools.lru_cache(maxsize=None)
def single_device_step():
  """The unsharded reference step (jitted once per process)."""
  return jax.jit(functools.partial(train_step, tiny_model(), tx(), HP), compiler_options=FAST_COMPILE)


def reference_run(steps: int, seeds=(0, 1, 2)):
  """`steps` single-device steps on tiny_batch(seed) batches: (state, [metrics])."""
  state = fresh_state()
  vae = tiny_params()["vae"]
  f = single_device_step()
  mets = []
  for i in range(steps):
    state, m = f(state, vae, tiny_batch(tiny_model().cfg, ROWS, seeds[i % len(seeds)]))
    mets.append(jax.tree.map(np.asarray, m))
  return jax.tree.map(np.asarray, state), mets
