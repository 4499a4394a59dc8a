"""Fine-tuning the released BAGEL-7B-MoT: upstream's TRAIN.md fine-tune recipe.

    python -m bagel_jax.train --config configs/bagel_7b_mot.py --workdir runs/ft \\
        --config.model.checkpoint=/path/BAGEL-7B-MoT --config.init.checkpoint=/path/BAGEL-7B-MoT \\
        --config.tokenizer=/path/BAGEL-7B-MoT \\
        --config.data.groups.t2i.path=/data/bagel_example/t2i ...

`init.checkpoint` is the release folder (ema.safetensors + ae.safetensors, read directly) or a
folder converted to Orbax (`python -m convert.safetensors_to_orbax`). Upstream's command:
`--finetune_from_hf --finetune_from_ema --lr 2e-5 --max_latent_size 64 --expected_num_tokens 10240
--max_num_tokens 11520 --max_num_tokens_per_sample 10240` over the defaults of
`train/pretrain_unified_navit.py` (AdamW 0.9/0.95/1e-15, no weight decay, 2000 warmup steps,
constant schedule, clip 1.0, EMA 0.9999, timestep shift 1.0, CE and MSE weights 1.0, CFG
dropout 0.1 / 0.3 / 0.3, VAE frozen). The data groups are upstream's `data/configs/example.yaml`.
One packed row per device (`data.rows` = the device count; 8 here).
"""

from bagel_jax.train import base_config

RELEASE = "hf/BAGEL-7B-MoT"  # replace on the command line
DATA = "your_data_path/bagel_example"


def get_config():
  c = base_config()
  c.model.checkpoint = RELEASE  # configs: llm_config.json, vit_config.json (max_latent_size 64 = 1024 px)
  c.model.param_dtype = "float32"  # fp32 master weights
  c.model.dtype = "bfloat16"  # bf16 compute (upstream: FSDP MixedPrecision bf16)
  c.model.attention = "auto"
  c.model.remat = "full"  # upstream checkpoints every decoder layer, ViT layer and the connector
  c.init.checkpoint = RELEASE
  c.tokenizer = RELEASE  # tokenizer.json (Qwen2.5)
  c.data.groups = {
      "t2i": dict(format="t2i_parquet", path=f"{DATA}/t2i", weight=1.0,
                  vae_max_size=1024, vae_min_size=512),
      "edit": dict(format="edit_parquet", path=f"{DATA}/editing/seedxedit_multi", weight=1.0,
                   vae_max_size=1024, vae_min_size=512, vit_max_size=518, vit_min_size=224),
      "vlm": dict(format="vlm_jsonl", path=f"{DATA}/vlm/llava_ov_si.jsonl", image_dir=f"{DATA}/vlm/images",
                  weight=1.0, vit_max_size=980, vit_min_size=378, vit_max_pixels=2_007_040),
  }
  c.data.rows = 8
  c.data.capacity = dict(tokens=11520, und=0, gen=0, vit=0, vae=0, ce=0, vae_images=16)
  c.data.expected_tokens = 10240
  c.data.max_tokens_per_sample = 10240
  c.data.workers = 4
  c.data.text_cond_dropout, c.data.vit_cond_dropout, c.data.vae_cond_dropout = 0.1, 0.3, 0.3
  c.optim.lr = 2e-5
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 2000
  c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay, c.optim.clip = 0.9, 0.95, 1e-15, 0.0, 1.0
  c.optim.freeze_llm = False
  c.optim.freeze_vit = False
  c.optim.freeze_und = False
  c.train.steps = 500_000
  c.train.seed = 4396
  c.train.ema_decay = 0.9999
  c.train.timestep_shift = 1.0
  c.train.ce_weight, c.train.mse_weight = 1.0, 1.0
  c.train.log_every = 10
  c.train.save_every = 2000
  c.train.keep = 3
  c.train.mesh = "fsdp=-1"
  return c
