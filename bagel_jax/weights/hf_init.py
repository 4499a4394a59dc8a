"""BAGEL for pre-training, built from Hugging Face checkpoints exactly as upstream's `main()` builds it.

Upstream (`train/pretrain_unified_navit.py`, `main()`) starts pre-training from a Qwen2.5 LLM
folder, a SigLIP vision folder and the FLUX autoencoder file.  `HFInit(args)` opens those
inputs, checks every key, shape and dtype, and presents the resulting model as the tensors of
a release-layout state dict (upstream's names and layouts, float32, what `model.state_dict()`
holds when `main()` has built the model), each produced on demand by one rule:

- LLM (`Qwen2ForCausalLM.from_pretrained`, no torch_dtype: float32): every checkpoint tensor,
  up-cast exactly, under `language_model.`; q_norm / k_norm (created by qk_norm, absent from
  Qwen2) are ones, absent with llm_qk_norm=False (nn.Identity); `init_moe()` (copy_init_moe)
  copies every und-expert tensor into its `*_moe_gen` twin, `model.norm` into
  `model.norm_moe_gen` included; with tie_word_embeddings, lm_head.weight is embed_tokens
  (listed under both names, as upstream's state dict lists it);
- SigLIP (`num_hidden_layers + 1 + vit_select_layer` layers, rope off): layers past those and
  the pooling head are dropped, `post_layernorm` kept; the patch Conv2d [O, C, p, p] becomes
  upstream's Linear, `permute(0, 2, 3, 1).reshape(O, p*p*C)`; the position table is taken as
  is (upstream never interpolates it: `interpolate_pos` only changes position ids);
- VAE (`load_ae`): the file unchanged (ae.safetensors);
- new modules: connector, vae2llm, time_embedder drawn as torch's default nn.Linear init,
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias (from `args.seed`, one stream per
  tensor name; torch's RNG itself is not reproduced); llm2vae zeros (`Bagel._init_weights`);
  vit_pos_embed / latent_pos_embed the 2-D sin-cos tables;
- vocabulary (`add_special_tokens` + `resize_token_embeddings(len(tokenizer))`, see
  `bagel_jax.weights.hf_tokenizer`): when the tokenizer lacks BAGEL's special tokens, embed_tokens
  and lm_head get `len(tokenizer)` rows: the old rows kept (or cut), each new row the mean of
  the old rows of its table (transformers' mean_resizing samples around that mean with
  1e-9 x their covariance; the noise is left out).

The converter (`python -m convert.hf_to_bagel`) writes these tensors as a release folder or an
Orbax folder; the trainer (`init.hf`) places them straight into its shardings.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import zlib
from typing import Any, Callable

import numpy as np

from bagel_jax.config import BagelConfig, LLMConfig, VAEConfig, ViTConfig
from bagel_jax.weights.errors import CheckpointError
from bagel_jax.weights.hf_checkpoint import HFCheckpoint
from bagel_jax.weights.safetensors_io import SafetensorsFile
from bagel_jax.weights.table import Rule, expected_upstream_shape, release_rules

LLM, VIT = "language_model.", "vit_model."
FREQUENCY_EMBEDDING_SIZE = 256  # upstream's TimestepEmbedder default
FLUX_SCALE_SHIFT = (0.3611, 0.1159)  # load_ae's AutoEncoderParams
TIED = "tied to embed_tokens"


@dataclasses.dataclass(frozen=True)
class HFInitArgs:
  """Upstream's ModelArguments / TrainingArguments that shape the model, under upstream's names and defaults."""
  llm: str = ""  # llm_path: a Qwen2.5 folder (config.json, safetensors, tokenizer files)
  vit: str = ""  # vit_path: a SigLIP vision folder
  vae: str = ""  # vae_path: the FLUX ae.safetensors
  tokenizer: str = ""  # "" = the llm folder (upstream loads the tokenizer from llm_path)
  # ModelArguments, in upstream's order
  llm_qk_norm: bool = True
  tie_word_embeddings: bool = False
  max_latent_size: int = 32
  latent_patch_size: int = 2
  vit_max_num_patch_per_side: int = 70
  connector_act: str = "gelu_pytorch_tanh"
  interpolate_pos: bool = False
  vit_select_layer: int = -2
  # TrainingArguments
  copy_init_moe: bool = True
  timestep_shift: float = 1.0
  seed: int = 4396  # our stream for the new modules (upstream: torch's RNG after set_seed(global_seed))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "HFInitArgs":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise CheckpointError(f"init.hf: unknown field {unknown[0]!r} (expected {sorted(names)})")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class Source:
  """One tensor of the state dict: its upstream shape, where it comes from, and how to make it (float32)."""
  shape: tuple[int, ...]
  origin: str
  make: Callable[[], np.ndarray]
  path: pathlib.Path | None = None  # the input file it is read from, if any


# ----------------------------------------------------------------------------- configs
def _need(cfg: dict, path: pathlib.Path, names: tuple[str, ...]) -> None:
  for n in names:
    if n not in cfg:
      raise CheckpointError(f"{path}: missing field '{n}'")


def llm_config(hf: dict, path: pathlib.Path, args: HFInitArgs, rows: int) -> LLMConfig:
  """Qwen2Config fields -> LLMConfig with BAGEL's settings (layer_module MoT, qk_norm, tie)."""
  _need(hf, path, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))
  if hf.get("model_type", "qwen2") != "qwen2":
    raise CheckpointError(f"{path}: model_type {hf.get('model_type')!r}, expected 'qwen2' (a Qwen2 / Qwen2.5 LLM)")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{path}: hidden_act {hf['hidden_act']!r}, expected 'silu'")
  if hf.get("rope_scaling"):
    raise CheckpointError(f"{path}: rope_scaling {hf['rope_scaling']!r} is not supported (plain RoPE only)")
  heads, kv = int(hf["num_attention_heads"]), int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
  if hf["hidden_size"] % heads or heads % kv:
    raise CheckpointError(f"{path}: hidden_size {hf['hidden_size']} / {heads} heads / {kv} KV heads do not divide")
  return LLMConfig(vocab_size=rows, hidden_size=int(hf["hidden_size"]), intermediate_size=int(hf["intermediate_size"]),
                   num_hidden_layers=int(hf["num_hidden_layers"]), num_attention_heads=heads, num_key_value_heads=kv,
                   rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(hf.get("rope_theta", 10000.0)),
                   max_position_embeddings=int(hf.get("max_position_embeddings", 32768)), qk_norm=args.llm_qk_norm, tie_word_embeddings=args.tie_word_embeddings)


def siglip_fields(raw: dict) -> dict:
  """SiglipVisionConfig.from_pretrained: a full SiglipConfig's vision_config, else the dict; HF defaults."""
  cfg = raw.get("vision_config", raw) if raw.get("model_type") == "siglip" else raw
  defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
  return {**defaults, **cfg}


def vit_config(raw: dict, path: pathlib.Path, args: HFInitArgs) -> ViTConfig:
  """SigLIP fields -> ViTConfig with num_hidden_layers + 1 + vit_select_layer layers; the grid checked."""
  s = siglip_fields(raw)
  n, used = int(s["num_hidden_layers"]), int(s["num_hidden_layers"]) + 1 + args.vit_select_layer
  if not 1 <= used <= n:
    raise CheckpointError(f"{path}: vit_select_layer {args.vit_select_layer} leaves {used} of its {n} layers")
  grid = int(s["image_size"]) // int(s["patch_size"])
  if grid != args.vit_max_num_patch_per_side:
    raise CheckpointError(f"{path}: image_size {s['image_size']} / patch_size {s['patch_size']} = a {grid}x{grid} "
                          f"position table, but vit_max_num_patch_per_side is {args.vit_max_num_patch_per_side} "
                          "(they must be equal: the same position ids index both)")
  return ViTConfig(hidden_size=int(s["hidden_size"]), intermediate_size=int(s["intermediate_size"]),
                   num_attention_heads=int(s["num_attention_heads"]), num_hidden_layers=used,
                   patch_size=int(s["patch_size"]), num_channels=int(s["num_channels"]),
                   layer_norm_eps=float(s["layer_norm_eps"]), hidden_act=str(s["hidden_act"]))


def vae_config(ae: SafetensorsFile) -> VAEConfig:
  """The FLUX autoencoder architecture of an ae.safetensors, read from its shapes (FLUX.1: ch 128, [1,2,4,4], 2).

  Upstream's load_ae hard-codes FLUX.1's; reading it from the file also serves smaller
  autoencoders of the same design.  scale/shift are load_ae's.
  """
  e = ae.entries

  def shape(key: str) -> tuple[int, ...]:
    if key not in e:
      raise CheckpointError(f"{ae.path}: not a FLUX autoencoder (no key {key})")
    return tuple(e[key].shape)

  def count(fmt: str) -> int:
    n = 0
    while fmt.format(n) in e:
      n += 1
    return n

  ch, in_ch = shape("encoder.conv_in.weight")[:2]
  levels = count("decoder.up.{}.block.0.conv2.weight")
  mult = tuple(shape(f"decoder.up.{i}.block.0.conv2.weight")[0] // ch for i in range(max(levels, 1)))
  return VAEConfig(in_channels=in_ch, ch=ch, out_ch=shape("decoder.conv_out.weight")[0], ch_mult=mult,
                   num_res_blocks=count("encoder.down.0.block.{}.conv1.weight"),
                   z_channels=shape("encoder.conv_out.weight")[0] // 2, scale_factor=FLUX_SCALE_SHIFT[0],
                   shift_factor=FLUX_SCALE_SHIFT[1], downsample=2 ** (len(mult) - 1))


def check_args(args: HFInitArgs) -> None:
  """Settings the project's model cannot represent, refused in one line each."""
  from bagel_jax.model.connector import ACTIVATIONS
  for name in ("llm", "vit", "vae"):
    if not getattr(args, name):
      raise CheckpointError(f"init.hf.{name} is not set (the {name} path)")
  if args.connector_act not in ACTIVATIONS:
    raise CheckpointError(f"connector_act {args.connector_act!r}: expected one of {sorted(ACTIVATIONS)}")
  for name in ("max_latent_size", "latent_patch_size", "vit_max_num_patch_per_side"):
    if int(getattr(args, name)) <= 0:
      raise CheckpointError(f"{name}={getattr(args, name)} must be positive")


# ----------------------------------------------------------------------------- tensor rules
def uniform_linear(key: str, shape: tuple[int, ...], fan_in: int, seed: int) -> np.ndarray:
  """torch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from (seed, key)."""
  bound = np.float32(1.0 / math.sqrt(fan_in))
  if float(bound) > 1.0 / math.sqrt(fan_in):
    bound = np.nextafter(bound, np.float32(0))
  rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
  return ((rng.random(shape, dtype=np.float32) * 2 - 1) * bound).astype(np.float32)


def normal_init(key: str, shape: tuple[int, ...], std: float, seed: int) -> np.ndarray:
  """HF's _init_weights for a Linear weight missing from the checkpoint: N(0, initializer_range)."""
  rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
  return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


def resize_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """resize_token_embeddings(rows): old rows kept (or cut); new rows the float32 mean of the old ones."""
  if rows <= x.shape[0]:
    return np.ascontiguousarray(x[:rows])
  mean = x.astype(np.float64).mean(axis=0).astype(np.float32)
  return np.concatenate([x, np.broadcast_to(mean, (rows - x.shape[0], x.shape[1]))], axis=0)


def conv_to_linear(w: np.ndarray) -> np.ndarray:
  """SigLIP's convert_conv2d_to_linear: [O, C, p, p] -> permute(0, 2, 3, 1) -> [O, p*p*C]."""
  return np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1))


def _f32(read: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
  return lambda: read().astype(np.float32)


# ----------------------------------------------------------------------------- the plan
class HFInit:
  """The initial BAGEL state of upstream's pre-training, as release-layout tensors made on demand.

  Presents the interface of `weights.UpstreamFiles` (`keys`, `shape_dtype`, `read`,
  `key_file`, `folder`), so the release loader, the table's validation and the converters
  read it as they read a release folder.
  """

  def __init__(self, args: HFInitArgs):
    from bagel_jax.weights.hf_tokenizer import bagel_vocab, read_vocabulary

    check_args(args)
    self.args = args
    self.llm = HFCheckpoint(args.llm, "LLM")
    self.vit = HFCheckpoint(args.vit, "SigLIP")
    self.ae = SafetensorsFile(args.vae)
    self.folder = pathlib.Path(args.llm)
    hf_rows = int(self.llm.config.get("vocab_size", 0))
    self.vocab = read_vocabulary(args.tokenizer or args.llm)
    self.rule = bagel_vocab(self.vocab, hf_rows)
    self.cfg = BagelConfig(
        llm=llm_config(self.llm.config, self.llm.folder / "config.json", args, self.rule.rows),
        vit=vit_config(self.vit.config, self.vit.folder / "config.json", args), vae=vae_config(self.ae),
        tokens=self.rule.tokens, latent_patch_size=args.latent_patch_size, max_latent_size=args.max_latent_size,
        vit_max_num_patch_per_side=args.vit_max_num_patch_per_side, connector_act=args.connector_act,
        interpolate_pos=args.interpolate_pos, timestep_shift=args.timestep_shift,
        frequency_embedding_size=FREQUENCY_EMBEDDING_SIZE)
    self.hf_vocab_size = hf_rows
    self.sources: dict[tuple[str, str], Source] = {}
    self._plan()

  # ---- the UpstreamFiles interface
  @property
  def key_file(self) -> dict[tuple[str, str], Any]:
    return {k: (s.path or f"<{s.origin}>") for k, s in self.sources.items()}

  def keys(self, file_id: str) -> set[str]:
    return {k for f, k in self.sources if f == file_id}

  def shape_dtype(self, file_id: str, key: str) -> tuple[tuple[int, ...], str]:
    return self.sources[(file_id, key)].shape, "F32"

  def read(self, file_id: str, key: str) -> np.ndarray:
    s = self.sources[(file_id, key)]
    x = s.make()
    if tuple(x.shape) != s.shape or x.dtype != np.float32:
      raise CheckpointError(f"{s.path or s.origin}: {key} came out {x.dtype}{list(x.shape)}, expected float32{list(s.shape)}")
    return x

  # ---- building the plan
  def _plan(self) -> None:
    from bagel_jax.api import BagelModel
    abstract = BagelModel(self.cfg).abstract_params()
    table = release_rules(self.cfg)  # tie_word_embeddings: lm_head.weight listed as embed_tokens
    self._shapes = {r.upstream: expected_upstream_shape(r, abstract) for r in table}
    for r in table:
      self.sources[(r.file, r.upstream)] = self._source(r, self._shapes[r.upstream])

  def _source(self, r: Rule, shape: tuple[int, ...]) -> Source:
    if r.file == "ae":
      return self._ae_source(r.upstream, shape)
    if r.upstream.startswith(LLM):
      return self._llm_source(r.upstream[len(LLM):], shape)
    if r.upstream.startswith(VIT):
      return self._vit_source(r.upstream[len(VIT):], shape)
    return self._new_source(r.upstream, shape)

  def _ae_source(self, key: str, shape: tuple[int, ...]) -> Source:
    ent = self.ae.entries.get(key)
    if ent is None:
      raise CheckpointError(f"{self.ae.path}: VAE checkpoint has no key {key}")
    if tuple(ent.shape) != shape or ent.dtype not in ("BF16", "F16", "F32"):
      raise CheckpointError(f"{self.ae.path}: key {key} is {ent.dtype}{list(ent.shape)}, expected a float {list(shape)}")
    return Source(shape, "vae: copy", _f32(lambda: self.ae.read(key)), self.ae.path)

  def _hf_copy(self, ckpt: HFCheckpoint, key: str, shape: tuple[int, ...], origin: str,
               post: Callable[[np.ndarray], np.ndarray] | None = None, hf_shape: tuple[int, ...] | None = None
               ) -> Source:
    ckpt.check(key, hf_shape or shape)
    read = _f32(lambda: ckpt.read(key))
    make = read if post is None else (lambda: post(read()))
    return Source(shape, f"{origin}:{key}", make, ckpt.path(key))

  def _llm_source(self, key: str, shape: tuple[int, ...]) -> Source:
    args = self.args
    if key == "lm_head.weight" and self.cfg.llm.tie_word_embeddings:
      # Tied: from_pretrained ties lm_head to embed_tokens (a checkpoint's own lm_head.weight is
      # not used) and resize_token_embeddings keeps the tie; the state dict lists both keys.
      src = self._vocab_source("model.embed_tokens.weight", shape)
      return dataclasses.replace(src, origin=f"{TIED} ({src.origin})")
    if key in ("model.embed_tokens.weight", "lm_head.weight"):
      return self._vocab_source(key, shape)
    if "q_norm" in key or "k_norm" in key:
      return Source(shape, "ones (qk_norm)", lambda: np.ones(shape, np.float32))
    if "_moe_gen" in key:
      und = key.replace("_moe_gen", "")
      if args.copy_init_moe:
        src = self._llm_source(und, shape)
        return dataclasses.replace(src, origin=f"init_moe copy of {und} ({src.origin})")
      return self._fresh_gen(key, shape)
    return self._hf_copy(self.llm, key, shape, "hf_qwen2")

  def _fresh_gen(self, key: str, shape: tuple[int, ...]) -> Source:
    """copy_init_moe=False: from_pretrained's init of the missing gen expert (N(0, initializer_range) / 0 / 1)."""
    if key.endswith(".bias"):
      return Source(shape, "zeros (HF init)", lambda: np.zeros(shape, np.float32))
    if "norm" in key:
      return Source(shape, "ones (HF init)", lambda: np.ones(shape, np.float32))
    std = float(self.llm.config.get("initializer_range", 0.02))
    return Source(shape, f"random N(0, {std})", lambda: normal_init(LLM + key, shape, std, self.args.seed))

  def _vocab_source(self, key: str, shape: tuple[int, ...]) -> Source:
    rows, hidden = self.rule.rows, self.cfg.llm.hidden_size
    hf_shape = (self.hf_vocab_size, hidden)
    post = (lambda x: resize_rows(x, rows)) if self.rule.resized else None
    if key == "lm_head.weight" and key not in self.llm.keys():
      # Qwen2.5 releases with tied embeddings ship no lm_head; with tie_word_embeddings=False
      # from_pretrained initialises it (HF _init_weights), before the resize.
      std = float(self.llm.config.get("initializer_range", 0.02))
      draw = lambda: normal_init(LLM + key, hf_shape, std, self.args.seed)  # noqa: E731
      return Source(shape, f"random N(0, {std}) (no lm_head in the checkpoint)",
                    draw if post is None else (lambda: post(draw())))
    src = self._hf_copy(self.llm, key, shape, "hf_qwen2", post, hf_shape)
    return dataclasses.replace(src, origin=src.origin + (f", resized to {rows} rows" if post else ""))

  def _vit_source(self, key: str, shape: tuple[int, ...]) -> Source:
    if key == "vision_model.embeddings.patch_embedding.weight":
      v = self.cfg.vit
      hf_shape = (v.hidden_size, v.num_channels, v.patch_size, v.patch_size)
      return self._hf_copy(self.vit, key, shape, "hf_siglip", conv_to_linear, hf_shape)
    return self._hf_copy(self.vit, key, shape, "hf_siglip")

  def _new_source(self, key: str, shape: tuple[int, ...]) -> Source:
    from bagel_jax.model.embeddings import sincos_2d_table
    if key in ("vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed"):
      grid = self.cfg.vit_max_num_patch_per_side if key.startswith("vit") else self.cfg.max_latent_size
      return Source(shape, f"sin-cos {grid}x{grid}", lambda: sincos_2d_table(grid, shape[1]))
    if key.startswith("llm2vae."):
      return Source(shape, "zeros (Bagel._init_weights)", lambda: np.zeros(shape, np.float32))
    fan_in = self._shapes[key.rsplit(".", 1)[0] + ".weight"][1]  # a bias takes its weight's fan_in
    return Source(shape, f"random U(+-1/sqrt({fan_in}))",
                  lambda: uniform_linear(key, shape, fan_in, self.args.seed))

  # ---- reporting
  def dropped_keys(self) -> dict[str, list[str]]:
    """Checkpoint tensors upstream's from_pretrained does not use (extra SigLIP layers, pooling head)."""
    used = {k for (_, k), s in self.sources.items() if not s.origin.startswith(TIED)}
    return {"llm": sorted(k for k in self.llm.keys() if LLM + k not in used),
            "vit": sorted(k for k in self.vit.keys() if VIT + k not in used)}


__all__ = ["HFInit", "HFInitArgs", "Source", "llm_config", "vit_config", "vae_config", "resize_rows", "conv_to_linear",
           "uniform_linear"]
