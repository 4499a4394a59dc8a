"""A tiny smoke-test run: `bagel_tiny` (random weights) on the small shapes dataset, float32 on CPU.

    python -m bagel_jax.train --config configs/tiny.py --workdir /tmp/tiny

Used by the tests (exact resume, bad input); trains a few steps in well under a minute once compiled.
"""

from bagel_jax.train import base_config
from configs.common import shapes_groups


def get_config():
  c = base_config()
  c.model.preset = "tiny"
  c.model.attention = "reference"
  c.tokenizer = "shapes"
  c.data.groups = shapes_groups("bagel_shapes/small")
  c.data.rows = 2
  c.data.capacity = dict(tokens=64, und=64, gen=32, vit=16, vae=32, ce=24, vae_images=2)
  c.data.expected_tokens = 64
  c.data.vae_max_size, c.data.vae_min_size = 32, 32  # 4 x 4 latent tokens (tiny VAE: 8 px per token)
  c.data.vit_max_size, c.data.vit_min_size = 28, 28  # 2 x 2 ViT patches of 14 px
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  c.optim.eps = 1e-8
  c.train.steps = 20
  c.train.ema_decay = 0.99
  c.train.log_every = 1
  c.train.save_every = 10
  c.train.keep = 2
  c.train.seed = 0
  return c
