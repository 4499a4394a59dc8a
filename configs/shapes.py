"""The CPU demo: a tiny BAGEL learns to draw and to describe coloured shapes (2 cores, < 20 minutes).

    python -m bagel_jax.train --config configs/shapes.py --workdir runs/shapes

1. renders the procedural "bagel_shapes" TFDS dataset (20,000 train / 512 test images, 32 x 32);
2. VAE stage: trains the tiny FLUX-architecture VAE (2x down, 4 latent channels) on the train
   images, then freezes it and sets its latent scale/shift from the latent statistics;
3. trains the MoT BAGEL (4 layers, width 128; ViT 2 layers, patch 8) on a 2:1 mix of
   text-to-image (caption -> 4 x 4 latent tokens, flow matching, timestep shift 3) and visual
   question answering (all of an image's questions as one multi-turn conversation);
4. evaluates: images generated for caption combinations never seen in training, read back by
   image analysis, and answers to questions about test images (bagel_jax/eval/shapes.py).

To start from Hugging Face-format checkpoints instead (the `init.hf` path of pre-training):
`python -m bagel_jax.weights.hf_random --out /tmp/hf_shapes`, then add `--config.init.hf.llm=/tmp/hf_shapes/qwen2
--config.init.hf.vit=/tmp/hf_shapes/siglip --config.init.hf.vae=/tmp/hf_shapes/ae.safetensors
--config.init.hf.vit_max_num_patch_per_side=4 --config.init.hf.max_latent_size=4 --config.init.hf.latent_patch_size=4`.
"""

from bagel_jax.train import base_config
from configs.common import shapes_groups


def get_config():
  c = base_config()
  c.model.preset = "shapes"
  c.model.attention = "reference"
  c.model.unroll_layers = True  # 4 layers: no stacked per-layer buffers in the backward (a faster CPU step)
  c.tokenizer = "shapes"
  c.data.groups = shapes_groups("bagel_shapes", t2i_weight=2.0, qa_turns="all")
  c.data.rows = 4
  # Every row packs two captions' images and one image's questions (the 2:1 mix, at most 111 tokens):
  # capacities sized to that row, not to the worst case, since the step's cost follows the capacities.
  c.data.capacity = dict(tokens=120, und=88, gen=32, vit=16, vae=32, ce=16, vae_images=2)
  c.data.expected_tokens = 112
  c.data.vae_max_size, c.data.vae_min_size = 32, 32  # 4 x 4 latent tokens
  c.data.vit_max_size, c.data.vit_min_size = 32, 32  # 4 x 4 ViT patches
  c.data.text_cond_dropout = 0.1  # CFG on the caption
  c.data.vit_cond_dropout = 0.0
  c.data.vae_cond_dropout = 0.0
  c.optim.lr = 1e-3
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 100
  c.optim.min_lr = 2e-5
  c.optim.eps = 1e-8
  c.train.steps = 8000
  c.train.timestep_shift = 3.0  # more training at high noise: small images need it to place objects
  c.train.seed = 0
  c.train.ema_decay = 0.995
  c.train.log_every = 50
  c.train.save_every = 500
  c.train.keep = 2
  c.vae_stage = dict(steps=800, group="t2i", batch=16, lr=3e-3, kl_weight=1e-6, seed=0, stats_images=2048)
  c.eval.kind = "shapes"
  c.eval.cfg_scale = 3.0
  c.eval.timestep_shift = 3.0
  c.eval.num_steps = 20
  c.eval.gen_prompts_per_combo = 8
  c.eval.und_images = 200
  return c
