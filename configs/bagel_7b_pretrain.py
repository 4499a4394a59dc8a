"""Pre-training BAGEL-7B-MoT from Qwen2.5-7B-Instruct + SigLIP + FLUX: upstream's pre-training recipe.

    python -m bagel_jax.train --config configs/bagel_7b_pretrain.py --workdir runs/pt \\
        --config.init.hf.llm=/path/Qwen2.5-7B-Instruct \\
        --config.init.hf.vit=/path/siglip-so400m-14-980-flash-attn2-navit \\
        --config.init.hf.vae=/path/flux/ae.safetensors \\
        --config.data.groups.t2i.path=/data/bagel_example/t2i ...

The model is built as upstream's `train/pretrain_unified_navit.py` `main()` builds it from those
checkpoints (`init.hf`, `bagel_jax/weights/hf_init.py`; docs/pretraining.md): the Qwen2.5 LLM
up-cast to float32 with its gen expert copied from the und expert (copy_init_moe), SigLIP's first
n + 1 + vit_select_layer layers, the FLUX VAE (frozen), new connector / vae2llm / time embedder,
llm2vae zero. The tokenizer is Qwen2.5's (`config.tokenizer` "": the one init.hf writes to
WORKDIR/hf_init/). Upstream's defaults otherwise (`scripts/train.sh`, `TRAIN.md`): lr 1e-4, packed
rows of 36,864 tokens (expected 32,768; at most 16,384 per sample), max_latent_size 32
("32 for low-resolution pre-training": VAE images up to 512 px), 500,000 steps.
"""

from configs import bagel_7b_mot

QWEN = "hf/Qwen2.5-7B-Instruct"  # replace on the command line
SIGLIP = "hf/siglip-so400m-14-980-flash-attn2-navit"  # upstream's vit_path default
FLUX_AE = "flux/vae/ae.safetensors"  # upstream's vae_path default


def get_config():
  c = bagel_7b_mot.get_config()
  c.model.checkpoint = ""  # the model config comes from init.hf
  c.init.checkpoint = ""
  c.init.hf.update(llm=QWEN, vit=SIGLIP, vae=FLUX_AE, tokenizer="", vit_select_layer=-2,
                   vit_max_num_patch_per_side=70, max_latent_size=32, latent_patch_size=2,
                   connector_act="gelu_pytorch_tanh", interpolate_pos=False, llm_qk_norm=True,
                   tie_word_embeddings=False, copy_init_moe=True, timestep_shift=1.0, seed=4396)
  c.tokenizer = ""  # Qwen2.5's, as init.hf writes it
  c.model.max_latent_size = 0  # init.hf.max_latent_size
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
