"""The app's requests on one `Inferencer`: upstream app.py's three functions, checked and serialised.

    svc = Service(Inferencer.from_checkpoint("ByteDance-Seed/BAGEL-7B-MoT"))
    image, thinking = svc.text_to_image("a red cat", T2I.replace(num_timesteps=20), image_ratio="4:3")
    image, thinking = svc.edit_image("photo.png", "make it night", EDIT)
    thinking, answer = svc.understand("photo.png", "What is in this image?", UND)

One lock serialises the requests: the Inferencer's compiled functions are shared (a size bucket
compiles once, whoever asks first) and no request sees another's caches.  A user's mistake (an
empty prompt, no image, an unreadable or oversized image, a setting out of range) raises
`AppInputError`, one line for the page.  Nothing here imports gradio.
"""

from __future__ import annotations

import dataclasses
import pathlib
import secrets
import threading
from typing import Any, Callable

from bagel_jax.inference.errors import InferenceError

Progress = Callable[[int, int], None]  # (steps done, steps in all)

# Upstream's ratios (height : width); the longer side is fixed (1024 there).
RATIOS = {"1:1": (1, 1), "4:3": (3, 4), "3:4": (4, 3), "16:9": (9, 16), "9:16": (16, 9)}
MAX_INPUT_PIXELS = 50_000_000  # uploads beyond this are refused before decoding

# Upstream app.py's example prompts (its example images are not shipped here).
PROMPTS = {
    "t2i": "A female cosplayer portraying an ethereal fairy or elf, wearing a flowing dress made of delicate fabrics "
           "in soft, mystical colors like emerald green and silver. She has pointed ears, a gentle, enchanting "
           "expression, and her outfit is adorned with sparkling jewels and intricate patterns. The background is a "
           "magical forest with glowing plants, mystical creatures, and a serene atmosphere.",
    "edit": "She boards a modern subway, quietly reading a folded newspaper, wearing the same clothes.",
    "und": "Can someone explain what's funny about this meme??",
}


class AppInputError(InferenceError):
  """A request the page explains in one line (the user's to fix, not a failure of the app)."""


@dataclasses.dataclass(frozen=True)
class GenSettings:
  """Upstream app.py's image-generation controls; defaults: its Text to Image tab."""

  think: bool = False
  seed: int = 0  # 0: a random seed (upstream), > 0: reproducible
  cfg_text_scale: float = 4.0
  cfg_img_scale: float = 1.0  # the edit tab's control (text-to-image: upstream's inferencer default)
  cfg_interval: float = 0.4  # the CFG interval's start; its end is fixed at 1.0
  cfg_renorm_type: str = "global"
  cfg_renorm_min: float = 0.0
  num_timesteps: int = 50
  timestep_shift: float = 3.0
  do_sample: bool = False  # the thinking controls (used only with think)
  max_think_token_n: int = 1024
  text_temperature: float = 0.3

  def replace(self, **kw: Any) -> "GenSettings":
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class UndSettings:
  """Upstream app.py's Image Understanding controls."""

  think: bool = False
  do_sample: bool = False
  text_temperature: float = 0.3
  max_new_tokens: int = 512

  def replace(self, **kw: Any) -> "UndSettings":
    return dataclasses.replace(self, **kw)


T2I = GenSettings()
EDIT = GenSettings(cfg_img_scale=2.0, cfg_interval=0.0, cfg_renorm_type="text_channel")
UND = UndSettings()


def ratio_shape(ratio: str, long_side: int, stride: int) -> tuple[int, int]:
  """(height, width) for an upstream ratio, the longer side `long_side`, both multiples of `stride`."""
  if ratio not in RATIOS:
    raise AppInputError(f"Image Ratio must be one of {', '.join(RATIOS)}; got {ratio!r}")
  h, w = RATIOS[ratio]
  scale = long_side / max(h, w)
  return max(stride, round(h * scale / stride) * stride), max(stride, round(w * scale / stride) * stride)


def split_thinking(text: str) -> tuple[str, str]:
  """"<think> plan </think> answer" -> (plan, answer); a text without the closing tag is all answer."""
  head, sep, tail = text.partition("</think>")
  if not sep:
    return "", text.strip()
  return head.replace("<think>", "").strip(), tail.strip()


def check_prompt(prompt: str | None) -> str:
  if prompt is None or not str(prompt).strip():
    raise AppInputError("Please enter a prompt.")
  return str(prompt)


def open_image(image: Any):
  """An uploaded image (a file path, a PIL image or a uint8 array) as RGB, or a one-line AppInputError."""
  import numpy as np
  from PIL import Image

  from bagel_jax.inference.inferencer import load_image, pil_img2rgb
  if image is None:
    raise AppInputError("Please upload an image.")
  if isinstance(image, (str, pathlib.Path)):
    _check_file(pathlib.Path(image))
    try:
      return load_image(image)
    except InferenceError as e:
      raise AppInputError(f"Input Image: {str(e).split(': ', 1)[-1]}") from None
  if isinstance(image, np.ndarray):
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)) or image.dtype != np.uint8:
      raise AppInputError(f"Input Image: a {image.dtype} array of shape {image.shape} is not an image")
    image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
  if not isinstance(image, Image.Image):
    raise AppInputError(f"Input Image: a {type(image).__name__} is not an image")
  _check_size(image.width, image.height)
  return pil_img2rgb(image)


def _check_size(width: int, height: int) -> None:
  if width * height > MAX_INPUT_PIXELS:
    raise AppInputError(f"Input Image: {width}x{height} pixels is too large (at most {MAX_INPUT_PIXELS:,} pixels)")


def _check_file(path: pathlib.Path) -> None:
  """The header only: a readable image of an acceptable size (before decoding the pixels)."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      size = im.size
  except Exception as e:  # PIL: UnidentifiedImageError, DecompressionBombError, OSError, ...
    raise AppInputError(f"Input Image: {path.name} is not a readable image ({type(e).__name__})") from None
  _check_size(*size)


class Service:
  """The app's request functions over one Inferencer, one request at a time."""

  def __init__(self, inferencer, *, label: str = "", prompts: dict[str, str] | None = None):
    self.inf = inferencer
    self.label = label
    self.prompts = dict(PROMPTS if prompts is None else prompts)
    self.lock = threading.Lock()
    cfg = inferencer.cfg
    self.long_side = min(1024, cfg.max_image_side_gen)
    self.stride = cfg.latent_downsample

  @staticmethod
  def _seed(seed: int) -> int:
    return int(seed) if int(seed) > 0 else secrets.randbelow(2**31 - 2) + 1

  def _gen_kwargs(self, s: GenSettings, progress: Progress | None, extra: dict) -> dict:
    if not 0.0 <= float(s.cfg_interval) <= 1.0:
      raise AppInputError(f"CFG Interval must be in [0, 1]; got {s.cfg_interval}")
    # Upstream: the thinking controls count only with Thinking on (else 1024 tokens, greedy, 0.3).
    return dict(think=bool(s.think), max_think_token_n=int(s.max_think_token_n) if s.think else 1024,
                do_sample=bool(s.do_sample) and bool(s.think),
                text_temperature=float(s.text_temperature) if s.think else 0.3,
                cfg_text_scale=float(s.cfg_text_scale), cfg_img_scale=float(s.cfg_img_scale),
                cfg_interval=(float(s.cfg_interval), 1.0), timestep_shift=float(s.timestep_shift),
                num_timesteps=int(s.num_timesteps), cfg_renorm_min=float(s.cfg_renorm_min),
                cfg_renorm_type=str(s.cfg_renorm_type), seed=self._seed(s.seed), progress=progress or False,
                **extra)

  def _run(self, items: list, **kw) -> list:
    with self.lock:
      return self.inf.interleave_inference(items, **kw)

  @staticmethod
  def _image_and_text(outs: list):
    text = next((o for o in outs if isinstance(o, str)), "")
    image = next((o for o in outs if not isinstance(o, str)), None)
    return image, text.strip()

  def text_to_image(self, prompt: str, s: GenSettings = T2I, *, image_ratio: str = "1:1",
                    progress: Progress | None = None, extra: dict | None = None):
    """(PIL image, thinking text or ""); `extra`: more Inferencer keywords (the step-cache controls)."""
    prompt = check_prompt(prompt)
    shape = ratio_shape(image_ratio, self.long_side, self.stride)
    outs = self._run([prompt], image_shapes=shape, **self._gen_kwargs(s, progress, extra or {}))
    return self._image_and_text(outs)

  def edit_image(self, image: Any, prompt: str, s: GenSettings = EDIT, *, progress: Progress | None = None,
                 extra: dict | None = None):
    """(PIL image of the input's size after the VAE resize, thinking text or "")."""
    img = open_image(image)
    prompt = check_prompt(prompt)
    outs = self._run([img, prompt], **self._gen_kwargs(s, progress, extra or {}))
    return self._image_and_text(outs)

  def understand(self, image: Any, prompt: str, s: UndSettings = UND) -> tuple[str, str]:
    """(thinking, answer); upstream's Max New Tokens is the inferencer's max_think_token_n."""
    img = open_image(image)
    prompt = check_prompt(prompt)
    sample = bool(s.do_sample) and float(s.text_temperature) > 0  # temperature 0: deterministic (greedy)
    [text] = self._run([img, prompt], understanding_output=True, think=bool(s.think), do_sample=sample,
                       text_temperature=float(s.text_temperature) if sample else 0.3,
                       max_think_token_n=int(s.max_new_tokens), seed=self._seed(0))
    text = text if isinstance(text, str) else " ".join(map(str, text))
    return split_thinking(text) if s.think else ("", text.strip())


__all__ = ["Service", "AppInputError", "GenSettings", "UndSettings", "T2I", "EDIT", "UND", "RATIOS", "PROMPTS",
           "ratio_shape", "split_thinking", "check_prompt", "open_image"]
