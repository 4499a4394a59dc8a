"""The interleaved inferencer (upstream `InterleaveInferencer`, `inferencer.py`): texts and images in,
text or an image out; think mode; editing; several input images; batches of requests.

    inf = Inferencer(model, params, tokenizer)
    [image] = inf.interleave_inference(["a red cat"], cfg_text_scale=4.0, cfg_img_scale=1.0)
    [text] = inf.interleave_inference([photo, "What is this?"], understanding_output=True)
    [thought, image] = inf.interleave_inference([photo, "make it night"], think=True, cfg_img_scale=2.0,
                                                cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")

A video input is a list of frames (PIL images or `ImageInput`s, e.g. from `load_video`): its frames
go in as images one after another, as upstream's training packs a clip (`<video>` becomes one
`<image>` per frame), with the ViT pixel budget shared by the frames.

Contexts follow upstream exactly: three per request, gen (everything), cfg_text (everything before
the last text) and cfg_img (the texts only, no image).  In think mode the system prompt opens gen and
cfg_img, and the generated reasoning is re-encoded and appended to gen only.  Each input image goes
into gen as a clean VAE image (skipped for understanding) and then as a ViT image; the generated
image has the size of the last input image (after the VAE resize), else `image_shapes`.
`batch(cfg_text_context=..., cfg_img_context=..., output_shapes=...)` let a caller that follows one
of upstream's benchmark scripts say what the CFG contexts hold and the output size
(`bagel_jax.inference.contexts`); the defaults are the rule above.

Compute: each distinct context is one row of one batched prefill (a context that is a prefix of
another, e.g. cfg_text of gen, reads the longer context's row with a shorter length instead of
being recomputed); upstream also prefills cfg_img for understanding requests, where it is never
used, and this is skipped.  Text decoding is `text.generate_tokens`; the image is `flow.denoise`
over the stacked contexts, then the VAE decoder.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.config import BagelConfig
from bagel_jax.data.transforms import pil_img2rgb
from bagel_jax.image import patchify, unpatchify
from bagel_jax.inference import flow, kv_cache as kc, taylorseer
from bagel_jax.inference.contexts import (CfgContext, Part, RequestContexts, assign_rows, plan_rows,
                                          request_contexts)
from bagel_jax.inference.errors import InferenceError
from bagel_jax.inference.text import generate_tokens, strip_generated
from bagel_jax.tokenizer import Tokenizer, check_special_tokens

# Upstream's system prompts (`inferencer.py`), verbatim: the model was trained with these strings.
VLM_THINK_SYSTEM_PROMPT = '''You should first think about the reasoning process in the mind and then provide the user with the answer. 
The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> answer here'''

GEN_THINK_SYSTEM_PROMPT = '''You should first think about the planning process in the mind and then generate the image. 
The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> image here'''


# ----------------------------------------------------------------------------- images in and out

def load_image(path: str | pathlib.Path):
  """Opens an image file as RGB (upstream `pil_img2rgb`: transparency composited on white)."""
  from PIL import Image, UnidentifiedImageError
  path = pathlib.Path(path)
  if path.is_dir():
    raise InferenceError(f"{path}: is a folder, not an image file")
  if not path.is_file():
    raise InferenceError(f"{path}: image file not found")
  try:
    with Image.open(path) as im:
      im.load()
      return pil_img2rgb(im)
  except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
    raise InferenceError(f"{path}: cannot read the image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt data'})") from None


@dataclasses.dataclass(frozen=True)
class ResizeRule:
  """Upstream `MaxLongEdgeMinShortEdgeResize` (PIL bicubic; Python's round, as upstream)."""

  max_size: int
  min_size: int
  stride: int
  max_pixels: int = 14 * 14 * 9 * 1024

  def _divisible(self, value: float) -> int:
    return max(self.stride, int(round(value / self.stride) * self.stride))

  def _apply(self, width: float, height: float, scale: float) -> tuple[int, int]:
    return self._divisible(round(width * scale)), self._divisible(round(height * scale))

  def size(self, width: int, height: int) -> tuple[int, int]:
    """(new_width, new_height)."""
    scale = min(self.max_size / max(width, height), 1.0)
    scale = max(scale, self.min_size / min(width, height))
    w, h = self._apply(width, height, scale)
    if w * h > self.max_pixels:
      w, h = self._apply(w, h, self.max_pixels / (w * h))
    if max(w, h) > self.max_size:
      w, h = self._apply(w, h, self.max_size / max(w, h))
    return w, h

  def __call__(self, image):
    from PIL import Image
    w, h = self.size(*image.size)
    return image.resize((w, h), Image.BICUBIC) if (w, h) != image.size else image.copy()


def vae_resize_rule(cfg: BagelConfig) -> ResizeRule:
  """The release's `ImageTransform(1024, 512, 16)`, scaled to the model's latent table."""
  mx = cfg.max_image_side_gen
  return ResizeRule(mx, max(cfg.latent_downsample, mx // 2), cfg.latent_downsample)


def vit_resize_rule(cfg: BagelConfig) -> ResizeRule:
  """The release's `ImageTransform(980, 224, 14)`, scaled to the model's ViT table."""
  mx, p = cfg.max_image_side_vit, cfg.vit.patch_size
  return ResizeRule(mx, max(p, round(mx * 224 / 980 / p) * p), p)


def to_tensor(image) -> np.ndarray:
  """ToTensor + Normalize(0.5, 0.5) in float32, channels last: [H, W, 3] in [-1, 1]."""
  x = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255)
  return (x - np.float32(0.5)) / np.float32(0.5)


def to_uint8(image: np.ndarray) -> np.ndarray:
  """Upstream `decode_image`: (x * 0.5 + 0.5).clamp(0, 1) * 255, then a TRUNCATING cast (quirk: not rounded)."""
  x = np.clip(np.asarray(image, np.float32) * np.float32(0.5) + np.float32(0.5), 0, 1) * np.float32(255)
  return x.astype(np.uint8)


@dataclasses.dataclass
class ImageInput:
  """An input image already as the model's tensors (channels last, in [-1, 1]).

  vae: [H, W, 3] for the VAE context (sides multiples of the latent stride); vit: [h, w, 3] for
  the ViT (sides multiples of the patch); vae_eps: the posterior draw [H/f, W/f, z] (None: drawn
  from the request's key, as upstream samples).
  """

  vae: np.ndarray | None = None
  vit: np.ndarray | None = None
  vae_eps: np.ndarray | None = None


Item = Union[str, ImageInput, Any]  # Any: a PIL image


def preprocess_image(image, cfg: BagelConfig, vit_rule: ResizeRule | None = None) -> ImageInput:
  """A PIL image -> upstream's VAE tensor (VAE resize) and ViT tensor (ViT resize of the VAE-resized image)."""
  image = vae_resize_rule(cfg)(pil_img2rgb(image))
  return ImageInput(vae=to_tensor(image), vit=to_tensor((vit_rule or vit_resize_rule(cfg))(image)))


def is_video(item) -> bool:
  """A non-empty list or tuple of images (PIL images or `ImageInput`s): one video input."""
  return (isinstance(item, (list, tuple)) and len(item) > 0
          and all(isinstance(f, ImageInput) or hasattr(f, "getbands") for f in item))


def preprocess_frames(frames: Sequence[Any], cfg: BagelConfig) -> list[ImageInput]:
  """A video's frames, each an image as `preprocess_image` makes it, except that the ViT pixel budget
  is shared by the frames (upstream's training transform gets `img_num` = the number of frames)."""
  rule = vit_resize_rule(cfg)
  rule = dataclasses.replace(rule, max_pixels=rule.max_pixels / len(frames))
  return [f if isinstance(f, ImageInput) else preprocess_image(f, cfg, rule) for f in frames]


def load_video(path: str | pathlib.Path, num_frames: int = 8, sample: str = "middle") -> list:
  """`num_frames` RGB frames of a clip (PyAV), spread over it as upstream's frame sampler spreads them
  ("middle": the middle frame of each of num_frames equal intervals; "rand" draws from seed 0)."""
  from bagel_jax.data.video import VideoError, clip_index, decode_frames, frame_indices
  path = pathlib.Path(path)
  if not path.is_file():
    raise InferenceError(f"{path}: video file not found")
  if num_frames < 1:
    raise InferenceError(f"num_frames must be at least 1; got {num_frames}")
  try:
    ix = clip_index(path)
    return decode_frames(path, frame_indices(num_frames, ix.num_frames, sample, np.random.default_rng(0),
                                             input_fps=ix.fps), ix)
  except VideoError as e:
    raise InferenceError(f"{path}: cannot read the video ({e})") from None
  except Exception as e:  # noqa: BLE001 -- FFmpeg raises many types
    why = str(e).splitlines()[0] if str(e) else "corrupt data"
    raise InferenceError(f"{path}: cannot read the video ({type(e).__name__}: {why})") from None


def check_image_size(cfg: BagelConfig, hw: Sequence[int], what: str = "image size") -> tuple[int, int]:
  h, w = (int(v) for v in hw)
  ld, mx = cfg.latent_downsample, cfg.max_image_side_gen
  if h <= 0 or w <= 0 or h % ld or w % ld:
    raise InferenceError(f"{what} {h}x{w} must be positive multiples of {ld} pixels per side")
  if not cfg.interpolate_pos and (h > mx or w > mx):
    raise InferenceError(f"{what} {h}x{w} exceeds the latent position table: at most {mx}x{mx} pixels "
                         f"(max_latent_size {cfg.max_latent_size} tokens x {ld} px)")
  return h, w


# ----------------------------------------------------------------------------- jitted helpers

@functools.partial(jax.jit, static_argnums=0)
def _encode_moments(model, params, images):
  return model.encode_moments(params, images)


@functools.partial(jax.jit, static_argnums=0)
def _decode(model, params, latents):
  return model.decode_latents(params, latents)


# ----------------------------------------------------------------------------- the inferencer

class Inferencer:
  def __init__(self, model, params, tokenizer: Tokenizer | None, *, cache_dtype=None, mesh=None):
    """mesh: a `bagel_jax.sharding` mesh: the parameters are placed by the project's rules and the
    denoising loop runs as `flow.jit_denoise` (explicit shardings, the noise buffer donated)."""
    self.model = model
    self.cfg: BagelConfig = model.cfg
    self.mesh = mesh
    self._samplers: dict = {}
    if mesh is not None:
      from bagel_jax import sharding as shd
      params = jax.device_put(params, shd.param_shardings(params, mesh))
    self.params = params
    self.tokenizer = tokenizer
    self.cache_dtype = cache_dtype
    self.last: dict[str, Any] = {}  # details of the last call with record=True (tests, debugging)
    self.timing: dict[str, float] = {}  # wall times of the last call's phases
    if tokenizer is not None:
      check_special_tokens(tokenizer, self.cfg.tokens, self.cfg.llm.vocab_size)

  @classmethod
  def from_checkpoint(cls, folder, *, tokenizer=None, dtype=None, quantize: str = "none",
                      attention_impl: str = "auto") -> "Inferencer":
    """Loads an upstream release folder (configs, ema.safetensors, ae.safetensors, tokenizer.json)
    or a folder converted to Orbax by `convert.safetensors_to_orbax` (configs, `state/`, tokenizer),
    or a Hugging Face repo id ("ByteDance-Seed/BAGEL-7B-MoT", `bagel_jax.weights.hub`).

    dtype: compute/parameter dtype (default bfloat16 on accelerators, float32 on CPU);
    quantize: "int8" for weight-only int8 decoder kernels; tokenizer: a tokenizer.json path
    (default: the folder's).
    """
    from bagel_jax.api import BagelModel
    from bagel_jax.weights.orbax_stream import STATE_DIR
    from bagel_jax.weights.load import load_checkpoint
    from bagel_jax.config import load_config
    from bagel_jax.inference.quantize import quantize_params
    from bagel_jax.tokenizer import load_tokenizer
    from bagel_jax.weights.hub import resolve_checkpoint
    folder = resolve_checkpoint(folder, need_tokenizer=tokenizer is None)
    tok = load_tokenizer(tokenizer if tokenizer is not None else folder / "tokenizer.json")
    if dtype is None:
      dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    cfg = load_config(folder)
    model = BagelModel(cfg, param_dtype=dtype, dtype=dtype, attention_impl=attention_impl)
    if (folder / STATE_DIR).is_dir():
      params = jax.tree.map(lambda x, a: x.astype(a.dtype), load_checkpoint(folder), model.abstract_params())
    else:
      params = model.load_upstream(folder)
    params = quantize_params(params, quantize, free_inputs=True)
    return cls(model, params, tok)

  def _sampler(self, cache, statics: dict):
    """The sharded denoising loop for these static settings (one jit per setting; shapes cached by jit)."""
    from bagel_jax import sharding as shd
    key = (tuple(cache.k.shape), tuple(sorted(statics.items())))
    if key not in self._samplers:
      self._samplers[key] = flow.jit_denoise(self.model, self.mesh, shd.param_shardings(self.params, self.mesh),
                                             flow.cache_shardings(cache, self.mesh), **statics)
    return self._samplers[key]

  # ---- pieces
  def _encode_text(self, text: str | Sequence[int]) -> kc.TextSegment:
    if not isinstance(text, str):
      return kc.TextSegment(tuple(int(i) for i in text))
    if self.tokenizer is None:
      raise InferenceError("a tokenizer is needed to encode text (pass token ids instead)")
    return kc.TextSegment(tuple(self.tokenizer.encode(text)))

  def _vae_segment(self, img: ImageInput, key: jax.Array) -> kc.VaeSegment:
    cfg = self.cfg
    x = np.asarray(img.vae, np.float32)
    h, w = check_image_size(cfg, x.shape[:2], "input image (VAE) size")
    moments = _encode_moments(self.model, self.params, jnp.asarray(x)[None])
    mean, logvar = jnp.split(moments, 2, axis=-1)
    eps = (jax.random.normal(key, mean.shape, jnp.float32) if img.vae_eps is None
           else jnp.asarray(img.vae_eps, jnp.float32).reshape(mean.shape))
    # Upstream's `vae_model.encode` samples the posterior: scale * (mean + std * eps - shift).
    lat = cfg.vae.scale_factor * (mean + jnp.exp(0.5 * logvar) * eps - cfg.vae.shift_factor)
    p = cfg.latent_patch_size
    return kc.VaeSegment(np.asarray(patchify(lat[0], p)), (h // cfg.latent_downsample, w // cfg.latent_downsample))

  def _vit_segment(self, img: ImageInput) -> kc.VitSegment:
    cfg = self.cfg
    x = np.asarray(img.vit, np.float32)
    p, side = cfg.vit.patch_size, cfg.vit_max_num_patch_per_side
    h, w = x.shape[:2]
    if h % p or w % p or h <= 0 or w <= 0:
      raise InferenceError(f"ViT input {h}x{w} must be positive multiples of the {p}-pixel patch")
    if not cfg.interpolate_pos and (h // p > side or w // p > side):
      raise InferenceError(f"ViT input {h}x{w} exceeds the ViT position table: at most {side * p}x{side * p} "
                           f"pixels ({side} patches of {p} px)")
    return kc.VitSegment(patchify(x, p), (h // p, w // p))

  def _parts(self, items: Sequence[Item], think: bool, understanding: bool, image_shape, key):
    """The request's parts in order (`contexts.Part`) and its output size: the last input image's
    (after the VAE resize), else `image_shape` (upstream `interleave_inference`)."""
    parts: list[Part] = []
    if think:
      parts.append(("system", self._encode_text(VLM_THINK_SYSTEM_PROMPT if understanding else GEN_THINK_SYSTEM_PROMPT)))
    shape = tuple(image_shape)
    for n, item in enumerate(items):
      if isinstance(item, (str, kc.TextSegment)) or (isinstance(item, (list, tuple)) and
                                                    all(isinstance(i, (int, np.integer)) for i in item)):
        parts.append(("text", item if isinstance(item, kc.TextSegment) else self._encode_text(item)))
      elif is_video(item):  # each frame an image, in order (as upstream's training packs a clip)
        for f, img in enumerate(preprocess_frames(item, self.cfg)):
          shape = self._add_image(parts, img, understanding, key, (n, f)) or shape
      elif isinstance(item, (list, tuple)):
        raise InferenceError(f"input {n}: a list must hold token ids or video frames (PIL images or ImageInput)")
      else:
        img = item if isinstance(item, ImageInput) else preprocess_image(item, self.cfg)
        shape = self._add_image(parts, img, understanding, key, (n,)) or shape
    return parts, shape

  def _build(self, items: Sequence[Item], think: bool, understanding: bool, image_shape, key,
             overrides: dict[str, CfgContext | None] | None = None) -> RequestContexts:
    """Upstream `interleave_inference`'s context bookkeeping, on segments (`contexts.request_contexts`).

    Quirk kept: cfg_img gets every text but no image, so for text-to-image it equals gen and an
    image scale > 1 only rescales the text guidance (effective scale 1 + s_i (s_t - 1)).
    """
    parts, shape = self._parts(items, think, understanding, image_shape, key)
    return request_contexts(parts, shape, think and not understanding, overrides)

  def _add_image(self, parts: list, img: ImageInput, understanding: bool, key, path: tuple[int, ...]
                 ) -> tuple[int, int] | None:
    """Upstream `update_context_image`: a clean VAE image (generation only; its posterior draw from
    `key` folded with `path`), then the ViT image, appended to `parts`. Returns the image's VAE size,
    if it has one."""
    shape = None
    if not understanding:
      if img.vae is None:
        raise InferenceError("an image input for image generation needs its VAE tensor")
      for i in path:
        key = jax.random.fold_in(key, i)
      parts.append(("image", self._vae_segment(img, key)))
    if img.vae is not None:
      shape = tuple(int(v) for v in np.asarray(img.vae).shape[:2])
    if img.vit is None:
      raise InferenceError("an image input needs its ViT tensor")
    parts.append(("image", self._vit_segment(img)))
    return shape

  def _prefill(self, reqs: Sequence[RequestContexts], names: Sequence[str], extra: int):
    """One batched prefill of every distinct context; returns (cache, {(i, name): (row, length, rope)})."""
    rows, where = plan_rows(reqs, names)
    lengths = [kc.context_length(r) for r in rows]
    capacity = kc.bucket(max(lengths) + extra)
    # Rows of very different lengths (an edit's gen context next to its text-only cfg_img) are
    # prefilled in separate calls, one per length bucket, so short rows are not padded to long ones.
    groups: dict[int, list[int]] = {}
    for r, n in enumerate(lengths):
      groups.setdefault(kc.bucket(n), []).append(r)
    caches, order = [], []
    for _, idx in sorted(groups.items()):
      chunk = kc.build_chunk([rows[i] for i in idx], [0] * len(idx), self.cfg)
      caches.append(kc.prefill(self.model, self.params, jax.tree.map(jnp.asarray, chunk), capacity,
                               cache_dtype=self.cache_dtype))
      order += idx
    cache = caches[0] if len(caches) == 1 else kc.concat_rows(caches, np.argsort(order))
    return cache, where

  def _generate_text(self, cache: kc.KVCache, rows, lengths, ropes, max_length: int, do_sample: bool,
                     temperature: float, top_k: int, top_p: float, key, record: bool):
    cfg = self.cfg
    if max_length < 1:
      raise InferenceError(f"max_length must be at least 1 (it counts the <|im_start|> token); got {max_length}")
    max_tokens = kc.bucket(max_length)
    cap = max(cache.capacity, kc.bucket(max(lengths) + max_tokens))
    sub = kc.take_rows(cache, jnp.asarray(rows, jnp.int32), jnp.asarray(lengths, jnp.int32),
                       jnp.asarray(ropes, jnp.int32), capacity=cap)
    b = len(rows)
    toks, counts, logits, _ = generate_tokens(
        self.model, self.params, sub, jnp.full((b,), cfg.tokens.bos_token_id, jnp.int32), jnp.int32(max_length),
        jnp.int32(cfg.tokens.eos_token_id), key, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
        max_tokens=max_tokens, do_sample=do_sample, record_logits=record)
    toks, counts = np.asarray(toks), np.asarray(counts)
    ids = [toks[i, :counts[i]].tolist() for i in range(b)]
    if record:
      self.last["tokens"] = ids
      self.last["step_logits"] = np.asarray(logits)
    if self.tokenizer is None:
      return ids, [None] * b
    return ids, [strip_generated(self.tokenizer.decode(t)) for t in ids]

  # ---- the public entry points
  def interleave_inference(self, input_lists: Sequence[Item], **kw) -> list:
    return self.batch([input_lists], **kw)[0]

  def __call__(self, image=None, text: str | None = None, **kw) -> dict[str, Any]:
    """Upstream `InterleaveInferencer.__call__`: {'image': ..., 'text': ...}."""
    items = ([image] if image is not None else []) + ([text] if text is not None else [])
    if not items:
      raise InferenceError("provide at least one input: an image or a text")
    out = {"image": None, "text": None}
    for o in self.interleave_inference(items, **kw):
      out["text" if isinstance(o, str) else "image"] = o
    return out

  def batch(self, requests: Sequence[Sequence[Item]], *, think: bool = False, understanding_output: bool = False,
            max_think_token_n: int = 1000, do_sample: bool = False, text_temperature: float = 0.3,
            top_k: int = 0, top_p: float = 1.0,
            cfg_text_scale: float = 3.0, cfg_img_scale: float = 1.5, cfg_interval=(0.4, 1.0),
            timestep_shift: float = 3.0, num_timesteps: int = 50, cfg_renorm_min: float = 0.0,
            cfg_renorm_type: str = "global", image_shapes=(1024, 1024), global_renorm_over_batch: bool = False,
            seed: int = 0, init_noise: Sequence[np.ndarray] | None = None, progress: bool | Callable = False,
            enable_taylorseer: bool = False, fresh_threshold: int = 3, max_order: int = 6, first_enhance: int = 5,
            taylorseer_mode: str = "upstream", fresh_tolerance: float = 0.0,
            cfg_text_context: CfgContext | None = None, cfg_img_context: CfgContext | None = None,
            output_shapes: Sequence[Sequence[int]] | None = None,
            record: bool = False, output: str = "pil") -> list[list]:
    """Runs several requests together (upstream's defaults). Returns, per request, its outputs:
    [text] (understanding), [image] or, with think, [reasoning text, image].

    Upstream's `interleave_inference` in order: contexts, prefill, think, per-size denoising groups,
    decode, each step a method below.

    enable_taylorseer: TaylorSeer step caching (upstream PR #232) with upstream's settings
    fresh_threshold, max_order, first_enhance; taylorseer_mode, fresh_tolerance: this port's
    variants (`bagel_jax.inference.taylorseer`).  Every call starts with fresh caches.

    cfg_text_context, cfg_img_context: what the CFG contexts hold (`contexts.CfgContext`), for
    callers that follow a script building them by hand (the benchmark runners); None: upstream's
    inferencer rule.  output_shapes: per request (H, W) of the image, instead of the last input
    image's size or `image_shapes`.

    output: "pil" (PIL images), or "array" (uint8 [H, W, 3]).  init_noise: per request
    [h*w, p*p*z] float32 noise at t = 1 (else drawn from `seed`).  progress: True for a tqdm bar over
    the denoising steps, or a callable (steps done, total) called after each step.
    """
    settings = flow.FlowSettings(num_timesteps=num_timesteps, timestep_shift=timestep_shift,
                                 cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale,
                                 cfg_interval=tuple(cfg_interval), cfg_renorm_type=cfg_renorm_type,
                                 cfg_renorm_min=cfg_renorm_min, global_renorm_over_batch=global_renorm_over_batch)
    if not understanding_output:
      settings.validate()
    taylor = taylorseer.from_options(enable_taylorseer, fresh_threshold=fresh_threshold, max_order=max_order,
                                     first_enhance=first_enhance, taylorseer_mode=taylorseer_mode,
                                     fresh_tolerance=fresh_tolerance)
    text_out = understanding_output or think
    if text_out and int(max_think_token_n) < 1:
      raise InferenceError(f"max_think_token_n must be at least 1 (it counts the <|im_start|> token); "
                           f"got {max_think_token_n}")
    if output_shapes is not None and len(output_shapes) != len(requests):
      raise InferenceError(f"output_shapes has {len(output_shapes)} entries for {len(requests)} requests")
    if not requests:
      return []
    self.last = {} if record else self.last
    key = jax.random.key(seed)
    overrides = {"cfg_text": cfg_text_context, "cfg_img": cfg_img_context}
    reqs = [self._build(items, think, understanding_output, image_shapes, jax.random.fold_in(key, 2 * i), overrides)
            for i, items in enumerate(requests)]
    names = _context_names(settings, understanding_output)
    if not understanding_output:
      for i, r in enumerate(reqs):
        r.image_shape = check_image_size(self.cfg, r.image_shape if output_shapes is None else output_shapes[i])
    check_positions(self.cfg, reqs, names, int(max_think_token_n) if text_out else 0, not understanding_output)
    self.timing = {}
    cache, where = self._timed_prefill(reqs, names, kc.bucket(max_think_token_n) if text_out else 0, record)
    results: list[list] = [[] for _ in reqs]
    plans = None
    if text_out:
      ids, texts = self._timed_text(cache, where, len(reqs), max_think_token_n, do_sample, text_temperature,
                                    top_k, top_p, jax.random.fold_in(key, 1_000_003), record)
      for i, t in enumerate(texts):
        results[i].append(t if t is not None else ids[i])
      if understanding_output:
        return results
      cache, plans = self._append_plans(cache, where, reqs, names, ids, texts)
    if record:
      self.last["contexts"] = _context_record(reqs, names, where, plans)
    sampling = _Sampling(settings, flow.schedule(settings), taylor, init_noise, key, progress, record)
    for shape, members in _shape_groups(reqs).items():
      for i, image in zip(members, self._image_group(cache, where, names, shape, members, sampling)):
        results[i].append(_to_pil(image) if output == "pil" else image)
    return results

  # ---- the steps of `batch`
  def _timed_prefill(self, reqs, names, extra: int, record: bool):
    t0 = time.perf_counter()
    cache, where = self._prefill(reqs, names, extra=extra)
    jax.block_until_ready(cache)
    self.timing["prefill_s"] = time.perf_counter() - t0
    if record:
      self.last["prefill_cache"] = cache
      self.last["where"] = dict(where)
    return cache, where

  def _timed_text(self, cache, where, n: int, max_length: int, do_sample, temperature, top_k, top_p, key, record):
    """Decodes from every request's gen context (understanding answers, think plans)."""
    gen = [where[(i, "gen")] for i in range(n)]
    t0 = time.perf_counter()
    ids, texts = self._generate_text(cache, [g[0] for g in gen], [g[1] for g in gen], [g[2] for g in gen],
                                     max_length, do_sample, temperature, top_k, top_p, key, record)
    self.timing["text_s"] = time.perf_counter() - t0
    self.timing["text_tokens"] = sum(len(t) for t in ids)
    return ids, texts

  def _append_plans(self, cache: kc.KVCache, where: dict, reqs: Sequence[RequestContexts], names, ids, texts):
    """Think: the decoded plan is re-encoded and appended to the contexts that receive it (upstream
    `update_context_text`; gen only unless a CfgContext asks for it).  Updates `where` in place;
    returns (cache, the plans' segments)."""
    segs = [self._encode_text(t if t is not None else ids[i][1:]) for i, t in enumerate(texts)]
    rows: list[list] = [[] for _ in range(cache.batch)]
    ropes = [0] * cache.batch
    for i, r in enumerate(reqs):
      for nm in (nm for nm in names if nm in r.think_into):
        row, length, rope = where[(i, nm)]
        rows[row] = [segs[i]]  # contexts sharing a row receive the plan at the same place
        ropes[row] = rope
        where[(i, nm)] = (row, length + segs[i].num_tokens, rope + segs[i].rope_advance)
    chunk = kc.build_chunk(rows, ropes, self.cfg)
    need = max(ln for _, ln, _ in where.values())
    if need > cache.capacity:
      cache = kc.take_rows(cache, jnp.arange(cache.batch), cache.lengths, cache.next_rope, capacity=kc.bucket(need))
    return kc.extend(self.model, self.params, cache, jax.tree.map(jnp.asarray, chunk)), segs

  def _image_group(self, cache, where, names, shape, members, s: "_Sampling") -> np.ndarray:
    """Denoises the requests `members` (one output size) against their stacked contexts, then decodes:
    uint8 images [n, H, W, 3]."""
    cfg = self.cfg
    grid = (shape[0] // cfg.latent_downsample, shape[1] // cfg.latent_downsample)
    picks = [where[(i, nm)] for nm in names for i in members]
    rows, lengths, ropes = ([p[k] for p in picks] for k in range(3))
    # The stacked contexts get the capacity they need (not the prefill's decoding reserve).
    stacked = kc.take_rows(cache, jnp.asarray(rows, jnp.int32), jnp.asarray(lengths, jnp.int32),
                           jnp.asarray(ropes, jnp.int32), capacity=min(cache.capacity, kc.bucket(max(lengths))))
    x0 = self._initial_noise(members, grid, s)
    t0 = time.perf_counter()
    x, rec = self._denoise(stacked, x0, grid, s)
    t1 = time.perf_counter()
    self.timing["denoise_s"] = self.timing.get("denoise_s", 0.0) + t1 - t0
    latents = unpatchify(x, grid[0], grid[1], cfg.latent_patch_size)
    # One image at a time: the decoder compiles once per size, and its activations stay small.
    decoded = np.concatenate([np.asarray(_decode(self.model, self.params, latents[j:j + 1]))
                              for j in range(latents.shape[0])])
    u8 = to_uint8(decoded)
    self.timing["vae_decode_s"] = self.timing.get("vae_decode_s", 0.0) + time.perf_counter() - t1
    if s.record:
      self.last.setdefault("groups", []).append(dict(
          members=members, final_latent=np.asarray(x), velocities=np.asarray(rec[0]), raw=np.asarray(rec[1]),
          decoded=decoded, image_u8=u8, schedule=s.schedule,
          taylor=None if s.taylor is None else [np.asarray(a) for a in rec[2:]],
          contexts=stacked))  # what the image was denoised against
    return u8

  def _initial_noise(self, members, grid, s: "_Sampling") -> jax.Array:
    n_tok, dim = grid[0] * grid[1], self.cfg.patch_latent_dim
    if s.init_noise is not None:
      return jnp.stack([jnp.asarray(s.init_noise[i], jnp.float32).reshape(n_tok, dim) for i in members])
    return jnp.stack([jax.random.normal(jax.random.fold_in(s.key, 2 * i + 1), (n_tok, dim), jnp.float32)
                      for i in members])

  def _denoise(self, stacked: kc.KVCache, x0, grid, s: "_Sampling"):
    """`flow.denoise` (or the sharded `flow.jit_denoise` with a mesh); returns (x, recorded)."""
    st = s.settings
    ts, dts, on = s.schedule
    with flow.progress_bar(len(ts), enabled=bool(s.progress), sink=s.progress if callable(s.progress) else None):
      args = (stacked, x0, jnp.asarray(ts), jnp.asarray(dts), jnp.asarray(on), jnp.float32(st.cfg_text_scale),
              jnp.float32(st.cfg_img_scale), jnp.float32(st.cfg_renorm_min))
      statics = dict(grid=grid, num_contexts=st.num_contexts, renorm_type=st.cfg_renorm_type,
                     over_batch=st.global_renorm_over_batch, progress=bool(s.progress), taylorseer=s.taylor)
      if self.mesh is None:
        x, rec = flow.denoise(self.model, self.params, *args, record=s.record, **statics)
      else:
        if s.record:
          raise InferenceError("record=True records the unsharded sampler only; build the Inferencer without a mesh")
        x, rec = self._sampler(stacked, statics)(self.params, *args), None
      return jax.block_until_ready(x), rec


@dataclasses.dataclass
class _Sampling:
  """The image settings of one `batch` call, shared by its size groups."""

  settings: flow.FlowSettings
  schedule: tuple  # (timesteps, dts, cfg on) of `flow.schedule`
  taylor: Any
  init_noise: Sequence[np.ndarray] | None
  key: jax.Array
  progress: bool | Callable
  record: bool


def check_positions(cfg: BagelConfig, reqs: Sequence[RequestContexts], names: Sequence[str], text_tokens: int,
                    image: bool) -> None:
  """Refuses requests whose contexts, plus the text to generate (each token one rope position) and
  the image (one position), reach past the LLM's `max_position_embeddings`: upstream would run them
  at positions the model never saw."""
  limit = cfg.llm.max_position_embeddings
  _, where = plan_rows(reqs, names)
  for (i, name), (_, _, rope) in sorted(where.items()):
    need = rope + text_tokens + int(image)
    if need > limit:
      what = " + ".join(x for x in (f"{rope} in the {name} context", f"{text_tokens} text tokens" if text_tokens else "",
                                    "1 for the image" if image else "") if x)
      raise InferenceError(f"request {i} needs {need} rope positions ({what}); the model's max_position_embeddings "
                           f"is {limit} (llm_config.json): shorten the prompt or lower the token limit")


def _context_names(settings: flow.FlowSettings, understanding: bool) -> list[str]:
  """The contexts to prefill: gen, plus the CFG contexts the settings use (none for understanding;
  upstream also prefills cfg_img there, never using it)."""
  if understanding:
    return ["gen"]
  return ["gen"] + (["cfg_text"] if settings.use_text_cfg else []) + (["cfg_img"] if settings.use_img_cfg else [])


def _shape_groups(reqs: Sequence[RequestContexts]) -> dict[tuple[int, int], list[int]]:
  groups: dict[tuple[int, int], list[int]] = {}
  for i, r in enumerate(reqs):
    groups.setdefault(tuple(r.image_shape), []).append(i)
  return groups


def _context_record(reqs: Sequence[RequestContexts], names, where, plans) -> list[dict]:
  """Per request {name: (segments, length, next rope)} as denoised against (plans included; a
  context without keys has no segments, only its position)."""
  out = []
  for i, r in enumerate(reqs):
    d = {}
    for nm in names:
      segs = [] if nm in r.positions else list(r.contexts[nm])
      if plans is not None and nm in r.think_into:
        segs.append(plans[i])
      d[nm] = (segs, *where[(i, nm)][1:])
    out.append(d)
  return out


def _to_pil(u8: np.ndarray):
  from PIL import Image
  return Image.fromarray(u8)


__all__ = ["Inferencer", "CfgContext", "ImageInput", "load_image", "load_video", "preprocess_image", "preprocess_frames", "is_video",
           "to_uint8", "to_tensor", "ResizeRule",
           "vae_resize_rule", "vit_resize_rule", "check_image_size", "VLM_THINK_SYSTEM_PROMPT",
           "GEN_THINK_SYSTEM_PROMPT"]
