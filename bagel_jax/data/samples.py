"""One training sample = a sequence plan + its image payloads, built from upstream's record formats.

A `Sample` holds the plan (`bagel_jax.layout` items) and, in plan order, the float32 HWC images
in [-1, 1] of its `VitImage` items (`vit`) and of its `VaeImage` items (`vae`). `SampleBuilder`
adds text and images the way upstream's datasets do:

- text-to-image (`T2IIterableDataset`): a caption (cfg-droppable, no loss), then the image as a
  generation target (a noisy VAE image with MSE);
- editing (`UnifiedEditIterableDataset.parse_row`): a random start image (clean VAE + ViT,
  cfg-droppable), then one instruction and target at a time, or (p = 0.5 when the span is
  longer than one step) the instructions concatenated before a single final target;
  intermediate targets are re-added clean (VAE + ViT) so later tokens can see them;
- understanding (`SftJSONLIterableDataset`, LLaVA format): human turns without loss, split at
  `<image>` placeholders into text and ViT images; gpt turns with CE loss. A `video` record's
  `<video>` placeholder becomes one `<image>` per sampled frame (`bagel_jax.data.video`).

Then upstream's pack-time CFG dropout (`layout.cfg_dropout`) with the configured probabilities;
a dropped image's payload is removed. Errors raise; `safe(...)` turns them into `Skipped`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from bagel_jax import layout as L
from bagel_jax.data.transforms import ImageTransform, decode_image


class SampleError(ValueError):
  """A record that cannot become a sample (it is skipped and counted, never fatal)."""


@dataclasses.dataclass
class Sample:
  plan: list
  vit: list  # float32 [H, W, 3] per VitImage item, in plan order
  vae: list  # float32 [H, W, 3] per VaeImage item, in plan order
  group: int = 0


@dataclasses.dataclass
class Skipped:
  group: int
  reason: str


@dataclasses.dataclass(frozen=True)
class Builders:
  """What every record parser needs: tokenizer, transforms, grid sizes and CFG dropout."""

  tokenizer: Any
  vae_transform: ImageTransform | None
  vit_transform: ImageTransform | None
  vit_patch: int
  latent_downsample: int
  text_cond_dropout: float = 0.0
  vit_cond_dropout: float = 0.0
  vae_cond_dropout: float = 0.0


def _transformed(transform, what: str, field: str, img, img_num: int, stride: int) -> tuple[np.ndarray, tuple[int, int]]:
  """`transform(img, img_num)` and its grid of `stride`-pixel tokens; refuses a size off the stride."""
  if transform is None:
    raise SampleError(f"this data group has no {what} image transform ({field})")
  x = transform(img, img_num)
  if x.shape[0] % stride or x.shape[1] % stride:
    raise SampleError(f"{what} image {x.shape[1]}x{x.shape[0]} is not a multiple of {stride} pixels")
  return x, (x.shape[0] // stride, x.shape[1] // stride)


class SampleBuilder:

  def __init__(self, b: Builders, group: int = 0):
    self.b, self.group = b, group
    self.plan: list = []
    self.payload: list = []  # per plan item: image or None

  def text(self, text: str, loss: bool, enable_cfg: bool) -> "SampleBuilder":
    ids = self.b.tokenizer.encode(text)
    if ids:  # upstream drops empty text items
      self.plan.append(L.Text(ids, loss=loss, enable_cfg=enable_cfg)); self.payload.append(None)
    return self

  def vae(self, img: Image.Image, loss: bool, enable_cfg: bool, img_num: int = 1, **frame) -> "SampleBuilder":
    """A VAE image; `frame`: split_start / split_end / frame_delta of a video frame (`layout.VaeImage`)."""
    x, grid = _transformed(self.b.vae_transform, "VAE", "vae_transform", img, img_num, self.b.latent_downsample)
    self.plan.append(L.VaeImage(grid, loss=loss, enable_cfg=enable_cfg, **frame))
    self.payload.append(x)
    return self

  def video(self, frames: Sequence[Image.Image], frame_indexes: Sequence[int], need_loss: bool,
            need_vae: bool, enable_cfg: bool = True) -> "SampleBuilder":
    """Upstream's `_add_video`: a clip's frames as VAE images in one split, a generation target
    (need_loss) or clean context (need_vae), the rope id advancing by the gap between frame indexes."""
    if int(need_loss) + int(need_vae) != 1:
      raise SampleError("a video is either a generation target or clean context (need_loss xor need_vae)")
    if len(frames) != len(frame_indexes) or not frames:
      raise SampleError(f"a video needs one frame index per frame ({len(frames)} frames, {len(frame_indexes)} indexes)")
    last = len(frames) - 1
    for i, (img, fi) in enumerate(zip(frames, frame_indexes)):
      delta = {"frame_delta": int(frame_indexes[i + 1]) - int(fi)} if i < last else {}
      self.vae(img, loss=need_loss, enable_cfg=enable_cfg and not need_loss, split_start=i == 0,
               split_end=i == last, **delta)
    return self

  def vit(self, img: Image.Image, enable_cfg: bool, img_num: int = 1) -> "SampleBuilder":
    x, grid = _transformed(self.b.vit_transform, "ViT", "vit_transform", img, img_num, self.b.vit_patch)
    self.plan.append(L.VitImage(grid, enable_cfg=enable_cfg))
    self.payload.append(x)
    return self

  def image(self, img: Image.Image, need_loss: bool, need_vae: bool, need_vit: bool,
            enable_cfg: bool = True) -> "SampleBuilder":
    """Upstream's `_add_image`: a noisy target, then a clean VAE copy, then a ViT copy, as asked."""
    if need_loss:
      self.vae(img, loss=True, enable_cfg=False)
    if need_vae:
      self.vae(img, loss=False, enable_cfg=enable_cfg)
    if need_vit:
      self.vit(img, enable_cfg=enable_cfg)
    return self

  def build(self, rng: np.random.Generator) -> Sample:
    if not any(getattr(i, "loss", False) for i in self.plan):
      raise SampleError("sample has no loss target")
    b = self.b
    plan, kept = L.cfg_dropout(self.plan, rng, b.text_cond_dropout, b.vit_cond_dropout, b.vae_cond_dropout)
    vit, vae = [], []
    for item, x, k in zip(self.plan, self.payload, kept):
      if k and isinstance(item, L.VitImage):
        vit.append(x)
      elif k and isinstance(item, L.VaeImage):
        vae.append(x)
    return Sample(plan=list(plan), vit=vit, vae=vae, group=self.group)


# ----------------------------------------------------------------------------- record formats
def _bytes(x) -> bytes:
  if isinstance(x, (bytes, bytearray, memoryview)):
    return bytes(x)
  if isinstance(x, np.ndarray) and x.dtype == object and x.shape == ():
    return bytes(x.item())
  if isinstance(x, dict) and "bytes" in x:  # HF datasets' Image struct in parquet
    return bytes(x["bytes"])
  raise SampleError(f"expected encoded image bytes, got {type(x).__name__}")


def _text(x) -> str:
  if isinstance(x, (bytes, np.bytes_)):
    return bytes(x).decode("utf-8")
  if isinstance(x, np.ndarray) and x.shape == ():
    return _text(x.item())
  return str(x)


def captions_of(value) -> list[str]:
  """Upstream's `captions` column: a JSON dict of caption variants (also accepted: a list or one string)."""
  value = _text(value) if not isinstance(value, (dict, list)) else value
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      return [value]
  if isinstance(value, dict):
    return [str(v) for v in value.values()]
  if isinstance(value, list):
    return [str(v) for v in value]
  return [str(value)]


def t2i_sample(rec: dict, b: Builders, rng: np.random.Generator, group: int = 0, *,
               image_key: str = "image", caption_key: str = "captions") -> Sample:
  img = decode_image(_bytes(rec[image_key]))
  caps = captions_of(rec[caption_key])
  cap = caps[int(rng.integers(len(caps)))] if caps else " "
  sb = SampleBuilder(b, group)
  sb.text(cap, loss=False, enable_cfg=True)
  sb.vae(img, loss=True, enable_cfg=False)
  return sb.build(rng)


def edit_sample(rec: dict, b: Builders, rng: np.random.Generator, group: int = 0) -> Sample:
  """Upstream's editing row: `image_list` (encoded images) and `instruction_list` (candidate lists)."""
  images = list(rec["image_list"])
  instr = [list(c) if not isinstance(c, str) else [c] for c in rec["instruction_list"]]
  n = len(images)
  if n < 2:
    raise SampleError(f"editing row has {n} image(s); needs at least 2")
  if len(instr) < n - 1:
    raise SampleError(f"editing row has {n} images but {len(instr)} instruction lists")
  img = lambda i: decode_image(_bytes(images[i]))
  pick = lambda i: str(instr[i - 1][int(rng.integers(len(instr[i - 1])))])
  start = int(rng.integers(n - 1))
  end = int(rng.integers(start + 1, min(start + 3, n)))
  sb = SampleBuilder(b, group)
  sb.image(img(start), need_loss=False, need_vae=True, need_vit=True)
  if end - start > 1 and rng.random() < 0.5:
    if end == n - 1:
      end -= 1
    text = "".join(pick(i) + ". " for i in range(start + 1, end + 1))
    sb.text(text.rstrip(), loss=False, enable_cfg=True)
    sb.image(img(end), need_loss=True, need_vae=False, need_vit=False)
  else:
    for i in range(start + 1, end + 1):
      sb.text(pick(i), loss=False, enable_cfg=True)
      last = i == end
      sb.image(img(i), need_loss=True, need_vae=not last, need_vit=not last)
  return sb.build(rng)


def conversation_elements(conversations: Sequence[dict], num_images: int) -> list[tuple[str, Any]]:
  """Upstream's `change_format`: [("text", (text, has_loss)) | ("image", None)]."""
  out = []
  for turn in conversations:
    who, value = turn.get("from"), str(turn.get("value", ""))
    if who == "human":
      if "<image>" not in value:
        out.append(("text", (value, False)))
        continue
      parts = value.split("<image>")
      for i, t in enumerate(parts):
        if t.strip():
          out.append(("text", (t.strip(), False)))
        if i != len(parts) - 1 and i < num_images:
          out.append(("image", None))
    elif who == "gpt":
      out.append(("text", (value, True)))
    else:
      raise SampleError(f"conversation turn from {who!r}; expected 'human' or 'gpt'")
  return out


def video_placeholders(conversations: Sequence[dict], num_frames: int) -> list[dict]:
  """Upstream's video record rule: `<video>` in the FIRST turn becomes one `<image>` per frame (a
  record whose first turn lacks it is refused, as upstream raises there). Returns a new list."""
  convs = [dict(t) for t in conversations]
  if not convs or "<video>" not in str(convs[0].get("value", "")):
    raise SampleError("video record: no <video> placeholder in the first conversation turn")
  convs[0]["value"] = str(convs[0]["value"]).replace("<video>", "<image>" * num_frames)
  return convs


def vlm_sample(rec: dict, b: Builders, rng: np.random.Generator, group: int = 0, *,
               load_image: Callable[[Any], Image.Image] | None = None,
               load_video: Callable[[Any, np.random.Generator], list] | None = None) -> Sample:
  """A LLaVA-style record: `image` (a path, bytes, or a list of them) or `video` (a clip path or a
  frame folder, read by `load_video` with this record's generator), and `conversations`.

  A clip's frames are ViT images one after another, each its own full split at its own rope id (as
  upstream's `SftJSONLIterableDataset` plans them), resized with the pixel budget split over the frames.
  """
  convs = rec["conversations"]
  if isinstance(convs, (str, bytes)):
    convs = json.loads(_text(convs))
  raw = rec.get("image")
  if raw is None and rec.get("video") is not None:  # upstream: `image` wins when a record has both
    if load_video is None:
      raise SampleError("this data group reads no video records (no frame sampler)")
    images = load_video(rec["video"], rng)
    convs = video_placeholders(convs, len(images))
  else:
    if raw is None:
      raws = []
    elif isinstance(raw, (list, tuple)) or (isinstance(raw, np.ndarray) and raw.dtype == object and raw.ndim == 1):
      raws = list(raw)
    else:
      raws = [raw]
    load = load_image or (lambda x: decode_image(_bytes(x)))
    images = [load(r) for r in raws]
  elements = conversation_elements(convs, len(images))
  sb = SampleBuilder(b, group)
  it = iter(images)
  for kind, val in elements:
    if kind == "text":
      sb.text(val[0], loss=val[1], enable_cfg=False)
    else:
      sb.vit(next(it), enable_cfg=False, img_num=len(images))
  return sb.build(rng)


def video_file_loader(image_dir: str, sampler) -> Callable[[Any, np.random.Generator], list]:
  """`video` values are clip paths (or frame folders ending in "/") under `image_dir`, or clip bytes."""
  def load(x, rng):
    if isinstance(x, (bytes, bytearray, dict)):
      return sampler(_bytes(x), rng)
    return sampler(os.path.join(image_dir, str(x)), rng)
  return load


def image_file_loader(image_dir: str) -> Callable[[Any], Image.Image]:
  def load(x):
    if isinstance(x, (bytes, bytearray, dict)):
      return decode_image(_bytes(x))
    path = os.path.join(image_dir, str(x))
    with open(path, "rb") as f:
      return decode_image(f.read())
  return load
