"""Upstream's image transforms (`data/transforms.py`, `data/data_utils.py`), with Pillow and numpy.

`ImageTransform(max_size, min_size, stride, max_pixels)(img, img_num=1)` resizes with
`MaxLongEdgeMinShortEdgeResize` and returns float32 HWC in [-1, 1] (Normalize(0.5, 0.5)):
1. scale = min(max_size / long side, 1), raised to at least min_size / short side;
2. each side rounded to the nearest multiple of `stride` (Python's round, at least one stride);
3. if the pixel count exceeds max_pixels / img_num, rescale and round again;
4. if the long side still exceeds max_size, rescale and round again;
5. bicubic resampling (Pillow; torchvision's antialiased resize on PIL images is the same call).

Presets used upstream: ViT 980/224/14 (inference), 980/378/14 with max_pixels 2,007,040 (VLM
training), 518/224/14 (edit training); VAE 1024/512/16 (T2I / edit pre-training).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = 200_000_000

DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024


def to_8bit(img: Image.Image) -> Image.Image:
  """16-bit and 32-bit grey images (modes I;16*, I, F) scaled to 8 bits; PIL's own convert clips them."""
  if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
    return img
  a = np.asarray(img, np.float64)
  top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
  return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")


def pil_img2rgb(img: Image.Image) -> Image.Image:
  """Upstream's `pil_img2rgb`: RGBA (and palette with transparency) composited on white."""
  img = to_8bit(img)
  if img.mode == "RGBA" or img.info.get("transparency", None) is not None:
    img = img.convert("RGBA")
    white = Image.new(mode="RGB", size=img.size, color=(255, 255, 255))
    white.paste(img, mask=img.split()[3])
    return white
  return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
  """Encoded bytes -> RGB PIL image (fully decoded here, so corrupt data raises here)."""
  img = Image.open(io.BytesIO(data))
  img.load()
  return pil_img2rgb(img)


def _make_divisible(value: float, stride: int) -> int:
  return max(stride, int(round(value / stride) * stride))


def resize_shape(width: int, height: int, max_size: int, min_size: int, stride: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS, img_num: int = 1) -> tuple[int, int]:
  """The (width, height) `MaxLongEdgeMinShortEdgeResize` produces for a width x height image."""

  def apply(w, h, scale):
    return _make_divisible(round(w * scale), stride), _make_divisible(round(h * scale), stride)

  scale = min(max_size / max(width, height), 1.0)
  scale = max(scale, min_size / min(width, height))
  w, h = apply(width, height, scale)
  if w * h > max_pixels / img_num:
    w, h = apply(w, h, max_pixels / img_num / (w * h))
  if max(w, h) > max_size:
    w, h = apply(w, h, max_size / max(w, h))
  return w, h


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  max_size: int
  min_size: int
  stride: int
  max_pixels: int = DEFAULT_MAX_PIXELS

  def size(self, width: int, height: int, img_num: int = 1) -> tuple[int, int]:
    return resize_shape(width, height, self.max_size, self.min_size, self.stride, self.max_pixels, img_num)

  @property
  def max_side(self) -> int:
    """The longest side this transform can output (a multiple of the stride)."""
    return -(-self.max_size // self.stride) * self.stride

  def __call__(self, img: Image.Image, img_num: int = 1) -> np.ndarray:
    w, h = self.size(*img.size, img_num=img_num)
    if (w, h) != img.size:
      img = img.resize((w, h), Image.BICUBIC)
    x = np.asarray(img, np.float32) / 255.0
    return (x - 0.5) / 0.5
