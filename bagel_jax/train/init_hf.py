"""`init.hf`: the trainer starts from Hugging Face checkpoints, as upstream's pre-training does.

`init.hf.llm / vit / vae` (+ upstream's model arguments, `weights.hf_init.HFInitArgs`) make
the model config, the tokenizer and the initial parameters through `weights.hf_init.HFInit`,
the same code as `python -m convert.hf_to_bagel`, with no intermediate folder: every parameter
is assembled slice by slice straight into its sharding (`weights.place.place_params`).  The
configs and tokenizer files the converter would write go to `WORKDIR/hf_init/` (the tokenizer
the data pipeline reads when `config.tokenizer` is "").
"""

from __future__ import annotations

import functools
import pathlib

from bagel_jax.train.errors import TrainConfigError

SIDE_DIR = "hf_init"


def hf_args(config):
  """The HFInitArgs of `config.init.hf`, or None when `init.hf.llm` is empty (no HF init)."""
  from bagel_jax.weights.errors import CheckpointError
  from bagel_jax.weights.hf_init import HFInitArgs
  hf = config.init.get("hf", None)
  if hf is None or not hf.get("llm", ""):
    return None
  try:
    args = HFInitArgs.from_dict(hf.to_dict() if hasattr(hf, "to_dict") else dict(hf))
  except CheckpointError as e:
    raise TrainConfigError(str(e)) from None
  if config.init.checkpoint or config.model.checkpoint:
    raise TrainConfigError("init.hf and init.checkpoint / model.checkpoint are both set: the model comes from one "
                           "of them")
  if int(config.model.get("max_latent_size", 0) or 0) not in (0, args.max_latent_size):
    raise TrainConfigError(f"model.max_latent_size={config.model.max_latent_size} differs from "
                           f"init.hf.max_latent_size={args.max_latent_size} (set the latter)")
  return args


@functools.lru_cache(maxsize=2)
def open_hf(args):
  """The HFInit of these args (opened once per process: headers, configs, tokenizer; no tensor read)."""
  from bagel_jax.tokenizer import TokenizerError
  from bagel_jax.weights.errors import CheckpointError
  from bagel_jax.weights.hf_init import HFInit
  try:
    return HFInit(args)
  except (CheckpointError, TokenizerError) as e:
    raise TrainConfigError(f"init.hf: {e}") from None


def write_side_files(init, workdir) -> pathlib.Path:
  """WORKDIR/hf_init/: llm/vit/bagel configs and tokenizer files, as the converter writes them (idempotent)."""
  import os
  from bagel_jax.weights.hf_export import side_texts
  out = pathlib.Path(workdir) / SIDE_DIR
  out.mkdir(parents=True, exist_ok=True)
  for name, text in side_texts(init).items():
    tmp = out / f".{name}.{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out / name)
  return out


def hf_params(init, model, shardings, vae_shardings, vae_params=None):
  """(bagel, vae) parameters in their shardings and the model's param_dtype; the VAE stage's VAE if given."""
  import jax
  from bagel_jax.weights.place import place_params
  abstract = model.abstract_params()
  params = place_params(init, model.cfg, abstract, {"bagel": shardings, "vae": vae_shardings})
  vae = params["vae"] if vae_params is None else jax.device_put(vae_params, vae_shardings)
  return params["bagel"], vae




def tokenizer_spec(config, workdir) -> str:
  """config.tokenizer, or (when it is "" and init.hf is set) the init's tokenizer.json under WORKDIR/hf_init/."""
  args = hf_args(config)
  if config.tokenizer or args is None:
    return config.tokenizer
  return str(write_side_files(open_hf(args), workdir) / "tokenizer.json")


__all__ = ["hf_args", "open_hf", "write_side_files", "hf_params", "tokenizer_spec", "SIDE_DIR"]
