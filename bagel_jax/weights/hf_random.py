"""Random models in Hugging Face format: a Qwen2 folder, a SigLIP vision folder and a FLUX ae.safetensors.

`write_random_hf(root, cfg)` writes what `hf_init.HFInit` reads, shaped so that the model it
builds has the config `cfg` (the LLM in bf16 shards with an index, as Qwen2.5 ships; SigLIP
with `extra_vit_layers` more layers than `cfg` uses and a pooling head, both dropped by the
init; a word-level vocabulary whose special tokens sit at `cfg.tokens`' ids).  For tests
and for starting the shapes demo from Hugging Face-format checkpoints:

    python -m bagel_jax.weights.hf_random --out /tmp/hf_shapes --preset shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
from typing import Sequence

import ml_dtypes
import numpy as np

from bagel_jax.config import BagelConfig
from bagel_jax.weights.hf_init import LLM, VIT
from bagel_jax.weights.safetensors_io import NP_TO_ST, SafetensorsWriter
from bagel_jax.weights.table import expected_upstream_shape, release_rules


def _save(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
  keys = sorted(tensors)
  w = SafetensorsWriter(path, [(k, tensors[k].shape, NP_TO_ST[tensors[k].dtype]) for k in keys])
  for k in keys:
    w.write(k, tensors[k])
  w.close()


def _draw(rng: np.random.Generator, key: str, shape: tuple[int, ...]) -> np.ndarray:
  if "norm" in key and key.endswith("weight"):
    return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
  scale = 1.0 / math.sqrt(shape[-1]) if len(shape) > 1 else 0.05
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _upstream_shapes(cfg: BagelConfig) -> dict[tuple[str, str], tuple[int, ...]]:
  from bagel_jax.api import BagelModel
  abstract = BagelModel(cfg).abstract_params()
  return {(r.file, r.upstream): expected_upstream_shape(r, abstract) for r in release_rules(cfg)}


def _qwen2_tensors(cfg, shapes, rng, lm_head: bool) -> dict[str, np.ndarray]:
  out = {}
  for (f, key), shape in sorted(shapes.items()):
    if f != "ema" or not key.startswith(LLM) or "_moe_gen" in key or "q_norm" in key or "k_norm" in key:
      continue
    if key.endswith("lm_head.weight") and not lm_head:
      continue
    out[key[len(LLM):]] = _draw(rng, key, shape).astype(ml_dtypes.bfloat16)
  return out


def _siglip_tensors(cfg, shapes, rng, extra_layers: int) -> dict[str, np.ndarray]:
  v, out = cfg.vit, {}
  for (f, key), shape in sorted(shapes.items()):
    if f == "ema" and key.startswith(VIT):
      out[key[len(VIT):]] = _draw(rng, key, shape)
  pe = "vision_model.embeddings.patch_embedding.weight"
  out[pe] = out[pe].reshape(v.hidden_size, v.patch_size, v.patch_size, v.num_channels).transpose(0, 3, 1, 2).copy()
  layer0 = {k.split("layers.0.", 1)[1]: x for k, x in out.items() if ".layers.0." in k}
  for n in range(v.num_hidden_layers, v.num_hidden_layers + extra_layers):
    for name, x in layer0.items():
      out[f"vision_model.encoder.layers.{n}.{name}"] = _draw(rng, name, x.shape)
  h = v.hidden_size
  head = {"probe": (1, 1, h), "attention.in_proj_weight": (3 * h, h), "attention.in_proj_bias": (3 * h,),
          "attention.out_proj.weight": (h, h), "attention.out_proj.bias": (h,), "layernorm.weight": (h,),
          "layernorm.bias": (h,), "mlp.fc1.weight": (v.intermediate_size, h), "mlp.fc1.bias": (v.intermediate_size,),
          "mlp.fc2.weight": (h, v.intermediate_size), "mlp.fc2.bias": (h,)}
  out.update({f"vision_model.head.{k}": _draw(rng, k, s) for k, s in head.items()})
  return out


def _tokenizer_files(folder: pathlib.Path, cfg: BagelConfig, words: Sequence[str]) -> None:
  from bagel_jax.tokenizer import SPECIAL_NAMES
  specials = {getattr(cfg.tokens, f): name for f, name in SPECIAL_NAMES.items()}
  lo, hi = min(specials), max(specials)
  specials.update({i: f"<|reserved_{i}|>" for i in range(lo, hi + 1) if i not in specials})  # contiguous ids
  vocab = {w: i for i, w in enumerate(words)}
  (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
  (folder / "merges.txt").write_text("#version: 0.2\n")
  added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                    "special": True} for i, s in sorted(specials.items())}
  tc = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added,
        "additional_special_tokens": [specials[i] for i in sorted(specials)], "bos_token": None,
        "eos_token": SPECIAL_NAMES["eos_token_id"], "pad_token": None, "unk_token": None}
  (folder / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))


def write_random_hf(root, cfg: BagelConfig, *, words: Sequence[str] | None = None, seed: int = 0,
                    extra_vit_layers: int = 1, shards: int = 2, lm_head: bool = True) -> dict[str, pathlib.Path]:
  """Writes root/qwen2, root/siglip and root/ae.safetensors; returns their paths (llm, vit, vae)."""
  root = pathlib.Path(root)
  llm_dir, vit_dir = root / "qwen2", root / "siglip"
  llm_dir.mkdir(parents=True, exist_ok=True)
  vit_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  shapes = _upstream_shapes(cfg)
  l, v = cfg.llm, cfg.vit
  qwen = _qwen2_tensors(cfg, shapes, rng, lm_head)
  keys = sorted(qwen)
  parts = [keys[i::shards] for i in range(shards)]
  weight_map = {}
  for i, part in enumerate(parts):
    name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    _save(llm_dir / name, {k: qwen[k] for k in part})
    weight_map.update({k: name for k in part})
  (llm_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
  (llm_dir / "config.json").write_text(json.dumps({
      "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "vocab_size": l.vocab_size,
      "hidden_size": l.hidden_size, "intermediate_size": l.intermediate_size, "num_hidden_layers": l.num_hidden_layers,
      "num_attention_heads": l.num_attention_heads, "num_key_value_heads": l.num_key_value_heads,
      "rms_norm_eps": l.rms_norm_eps, "rope_theta": l.rope_theta, "rope_scaling": None, "tie_word_embeddings": False,
      "initializer_range": 0.02, "torch_dtype": "bfloat16"}, indent=2))
  first = min(dataclasses.asdict(cfg.tokens).values())
  _tokenizer_files(llm_dir, cfg, words or [f"w{i}" for i in range(first)])
  _save(vit_dir / "model.safetensors", _siglip_tensors(cfg, shapes, rng, extra_vit_layers))
  (vit_dir / "config.json").write_text(json.dumps({
      "model_type": "siglip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
      "num_attention_heads": v.num_attention_heads, "num_hidden_layers": v.num_hidden_layers + extra_vit_layers,
      "patch_size": v.patch_size, "image_size": v.patch_size * cfg.vit_max_num_patch_per_side,
      "num_channels": v.num_channels, "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps}, indent=2))
  ae = {k: _draw(rng, k, s) for (f, k), s in shapes.items() if f == "ae"}
  _save(root / "ae.safetensors", ae)
  return {"llm": llm_dir, "vit": vit_dir, "vae": root / "ae.safetensors"}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(prog="python -m bagel_jax.weights.hf_random", description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True, type=pathlib.Path)
  ap.add_argument("--preset", choices=("shapes", "tiny"), default="shapes")
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  if a.preset == "shapes":
    from bagel_jax.data import shapes
    cfg, words = shapes.model_config(), list(shapes.WORDS)
  else:
    from bagel_jax.config import bagel_tiny
    cfg, words = bagel_tiny(), None
  paths = write_random_hf(a.out, cfg, words=words, seed=a.seed)
  print(" ".join(f"--{k} {p}" for k, p in paths.items()))


if __name__ == "__main__":
  main()
