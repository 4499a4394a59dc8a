"""Pre-training a BAGEL-7B-MoT-shaped model: upstream's `scripts/train.sh` defaults.

    python -m bagel_jax.train --config configs/bagel_7b_pretrain.py --workdir runs/pt \\
        --config.model.checkpoint=/path/BAGEL-7B-MoT --config.tokenizer=/path/BAGEL-7B-MoT ...

Differences from the fine-tune recipe (`bagel_7b_mot.py`): lr 1e-4, packed rows of 36,864
tokens (expected 32,768; at most 16,384 per sample), low-resolution generation
(max_latent_size 32: VAE images up to 512 px), 500,000 steps. The model starts from
`init.checkpoint` if set, else from random weights (upstream initialises the LLM from
Qwen2.5 and the ViT from SigLIP; loading those separate checkpoints is not implemented, so
use the release's weights or a converted folder as the starting point).
"""

from configs import bagel_7b_mot


def get_config():
  c = bagel_7b_mot.get_config()
  c.init.checkpoint = ""
  c.model.max_latent_size = 32  # upstream: "32 for low-resolution pre-training"
  for g in c.data.groups.values():
    if "vae_max_size" in g:
      g.vae_max_size, g.vae_min_size = 512, 256  # max_latent_size 32 x 16 px
  c.data.vae_max_size, c.data.vae_min_size = 512, 256
  c.data.capacity = dict(tokens=36864, und=0, gen=0, vit=0, vae=0, ce=0, vae_images=32)
  c.data.expected_tokens = 32768
  c.data.max_tokens_per_sample = 16384
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 2000
  c.train.ema_decay = 0.9999
  c.train.timestep_shift = 1.0
  c.train.steps = 500_000
  return c
