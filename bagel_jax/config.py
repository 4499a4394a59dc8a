"""Model configuration: upstream checkpoint configs plus BAGEL's fixed settings.

`load_config(folder)` reads `llm_config.json` and `vit_config.json` from an
upstream-format checkpoint folder and applies the settings the release keeps in
code; a `bagel_config.json` beside them overrides those settings (the VAE
architecture among them).  `bagel_7b_mot()` and `bagel_tiny()` are presets.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from bagel_jax.jsonfile import read_json


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  max_position_embeddings: int = 32768  # the rope positions the model was trained for (upstream's Qwen2 config)
  qk_norm: bool = True
  tie_word_embeddings: bool = False
  layer_module: str = "Qwen2MoTDecoderLayer"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_attention_heads: int = 16
  num_hidden_layers: int = 26  # layers actually used (the release config lists 27)
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def patch_dim(self) -> int:
    return self.num_channels * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """FLUX autoencoder architecture (release: FLUX.1 ae)."""

  resolution: int = 256
  in_channels: int = 3
  ch: int = 128
  out_ch: int = 3
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 16
  scale_factor: float = 0.3611
  shift_factor: float = 0.1159
  downsample: int = 8


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  bos_token_id: int = 151644  # <|im_start|>
  eos_token_id: int = 151645  # <|im_end|>
  start_of_image: int = 151652  # <|vision_start|>
  end_of_image: int = 151653  # <|vision_end|>


@dataclasses.dataclass(frozen=True)
class BagelConfig:
  llm: LLMConfig = LLMConfig()
  vit: ViTConfig = ViTConfig()
  vae: VAEConfig = VAEConfig()
  tokens: SpecialTokens = SpecialTokens()
  visual_gen: bool = True
  visual_und: bool = True
  latent_patch_size: int = 2
  max_latent_size: int = 64
  vit_max_num_patch_per_side: int = 70
  connector_act: str = "gelu_pytorch_tanh"
  interpolate_pos: bool = False
  timestep_shift: float = 1.0
  frequency_embedding_size: int = 256

  @property
  def latent_channels(self) -> int:
    return self.vae.z_channels

  @property
  def patch_latent_dim(self) -> int:
    return self.latent_patch_size**2 * self.vae.z_channels

  @property
  def latent_downsample(self) -> int:
    """Pixels per latent token side."""
    return self.vae.downsample * self.latent_patch_size

  @property
  def max_image_side_gen(self) -> int:
    return self.max_latent_size * self.latent_downsample

  @property
  def max_image_side_vit(self) -> int:
    return self.vit_max_num_patch_per_side * self.vit.patch_size

  def replace(self, **kw: Any) -> "BagelConfig":
    return dataclasses.replace(self, **kw)


class ConfigError(ValueError):
  """A checkpoint folder's configuration is missing or malformed."""


def bagel_7b_mot() -> BagelConfig:
  """The released BAGEL-7B-MoT."""
  return BagelConfig()


def bagel_tiny() -> BagelConfig:
  """The shape of the bundled `bagel_tiny_a` fixture (random weights)."""
  return BagelConfig(
      llm=LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2),
      vit=ViTConfig(hidden_size=32, intermediate_size=80, num_attention_heads=2, num_hidden_layers=2),
      vae=VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, z_channels=16, downsample=4),
      tokens=SpecialTokens(bos_token_id=500, eos_token_id=501, start_of_image=508, end_of_image=509),
      max_latent_size=8,
      vit_max_num_patch_per_side=8,
  )


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  return read_json(path, ConfigError, object_required="invalid JSON (not an object)")


def _pick(cls: type, src: dict[str, Any], path: pathlib.Path, required: tuple[str, ...] = ()) -> Any:
  for name in required:
    if name not in src:
      raise ConfigError(f"{path}: missing field '{name}'")
  names = {f.name for f in dataclasses.fields(cls)}
  kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in src.items() if k in names}
  return cls(**kw)


_LLM_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads")
_VIT_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size")


def load_config(folder: str | pathlib.Path) -> BagelConfig:
  """Reads an upstream checkpoint folder's configs into a BagelConfig."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise ConfigError(f"{folder}: checkpoint folder not found")
  llm_path, vit_path = folder / "llm_config.json", folder / "vit_config.json"
  llm_raw, vit_raw = _read_json(llm_path), _read_json(vit_path)
  extra_path = folder / "bagel_config.json"
  extra = _read_json(extra_path) if extra_path.exists() else {}

  llm_fixed = {"qk_norm": True, "tie_word_embeddings": False, "layer_module": "Qwen2MoTDecoderLayer"}
  llm_fixed.update({k: v for k, v in extra.get("llm", {}).items() if k in ("qk_norm", "tie_word_embeddings", "layer_module")})
  llm = _pick(LLMConfig, {**llm_raw, **llm_fixed}, llm_path, _LLM_REQUIRED)
  if llm.layer_module != "Qwen2MoTDecoderLayer":
    raise ConfigError(f"{llm_path}: layer_module {llm.layer_module!r} is not supported (only Qwen2MoTDecoderLayer)")

  vit_extra = dict(extra.get("vit", {}))
  if vit_extra.get("rope", False):
    raise ConfigError(f"{extra_path}: vit.rope=true is not supported (the release disables the ViT's 2-D RoPE)")
  vit_src = dict(vit_raw)
  # Upstream loaders build num_hidden_layers - 1 layers (the penultimate features).
  if "num_hidden_layers" in vit_src:
    vit_src["num_hidden_layers"] = vit_extra.pop("num_hidden_layers_used", vit_src["num_hidden_layers"] - 1)
  vit_src.update({k: v for k, v in vit_extra.items() if k in ("hidden_act", "layer_norm_eps")})
  vit = _pick(ViTConfig, vit_src, vit_path, _VIT_REQUIRED)

  vae = _pick(VAEConfig, extra["vae"], extra_path) if "vae" in extra else VAEConfig()
  tokens = SpecialTokens(**extra["special_token_ids"]) if "special_token_ids" in extra else SpecialTokens()
  top = {k: extra[k] for k in ("visual_gen", "visual_und", "latent_patch_size", "max_latent_size",
                                "vit_max_num_patch_per_side", "connector_act", "interpolate_pos",
                                "timestep_shift", "frequency_embedding_size") if k in extra}
  cfg = BagelConfig(llm=llm, vit=vit, vae=vae, tokens=tokens, **top)
  if "latent_downsample" in extra and extra["latent_downsample"] != cfg.latent_downsample:
    raise ConfigError(f"{extra_path}: latent_downsample {extra['latent_downsample']} != vae.downsample * latent_patch_size = {cfg.latent_downsample}")
  return cfg
