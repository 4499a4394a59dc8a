"""Shared core of the generation and editing benchmarks (upstream `eval/gen`): settings, inputs,
and atomic image outputs.

Inputs are built by `bagel_jax.eval.images`.  The initial noise and the VAE posterior draw come
from per-item seeds, so an image does not depend on the batch it ran in nor on the device.
"""

from __future__ import annotations

import pathlib
from typing import Any, ClassVar, Sequence

from bagel_jax.eval.core import Benchmark, Item, Request
from bagel_jax.eval.images import crop_to_content, edit_input
from bagel_jax.eval.store import write_png, write_text
from bagel_jax.inference.contexts import CfgContext

# Upstream's think settings (`generate_text(do_sample=True, temperature=0.3)`); the token limit is per benchmark.
THINK_SAMPLING = dict(do_sample=True, text_temperature=0.3)


def flow_settings(cfg_text_scale: float, cfg_img_scale: float, cfg_interval: tuple[float, float],
                  cfg_renorm_type: str) -> dict[str, Any]:
  """Sampler settings of upstream's benchmark scripts: these four vary; all use 50 timesteps,
  timestep shift 3.0 and cfg_renorm_min 0."""
  return dict(cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale, cfg_interval=cfg_interval,
              timestep_shift=3.0, num_timesteps=50, cfg_renorm_min=0.0, cfg_renorm_type=cfg_renorm_type)


# The editing scripts' contexts (gen_images_mp_imgedit.py `editing_image_with_think` lines 78-234, the
# same in _kris and _rise; gedit/gen_images_gedit.py lines 192-320): gen = [system, images,
# instruction, plan]; cfg_text = [system, images] (a copy of gen before the instruction); cfg_img =
# [system, instruction, plan] (a fresh cache).  Without --think: [images, instruction], [images],
# [instruction].  The system prompt and the plan exist in think mode only.
EDIT_CONTEXTS: dict[str, CfgContext] = {
    "cfg_text_context": CfgContext(system=True, images=True),
    "cfg_img_context": CfgContext(system=True, texts=True, think=True)}


class ImageBenchmark(Benchmark):
  """Generation/editing: subclasses set `defaults` and implement `load`, `outputs` and `requests`.

  Each request's `tag` is its output path; with --think the reasoning is saved beside it as .txt
  (upstream `--think`), written before the image, whose presence marks the request finished.
  `contexts`: what the CFG contexts hold in upstream's script (`Inferencer.batch` options; empty:
  the inferencer's rule).
  """

  task: ClassVar[str] = "generation"
  defaults: ClassVar[dict[str, Any]] = {}
  contexts: ClassVar[dict[str, CfgContext]] = {}
  think_tokens: ClassVar[int] = 2048
  crop: ClassVar[bool] = True
  save_think: ClassVar[bool] = True

  def infer_kwargs(self) -> dict[str, Any]:
    a, kw = self.args, dict(self.defaults)
    for name in ("cfg_text_scale", "cfg_img_scale", "cfg_interval", "timestep_shift", "cfg_renorm_type",
                 "cfg_renorm_min"):
      if getattr(a, name, None) is not None:
        kw[name] = tuple(getattr(a, name)) if name == "cfg_interval" else getattr(a, name)
    if getattr(a, "steps", None):
      kw["num_timesteps"] = a.steps
    if getattr(a, "think", False):
      kw.update(think=True, max_think_token_n=a.max_think_tokens or self.think_tokens, **THINK_SAMPLING)
    return {**kw, **self.contexts}

  def outputs(self, item: Item) -> list[pathlib.Path]:
    raise NotImplementedError

  def is_done(self, item: Item) -> bool:
    return all(p.is_file() for p in self.outputs(item))

  def pending(self, item: Item) -> list[tuple[int, pathlib.Path]]:
    return [(k, p) for k, p in enumerate(self.outputs(item)) if not p.is_file()]

  def save(self, item: Item, requests: Sequence[Request], outputs: Sequence[list]) -> None:
    for req, out in zip(requests, outputs):
      path = pathlib.Path(req.tag)
      if len(out) == 2 and self.save_think:
        write_text(path.with_suffix(".txt"), out[0])
      image = out[-1]
      write_png(path, crop_to_content(image) if self.crop else image)

  def item_seed(self, index: int, k: int = 0) -> tuple[int, ...]:
    return (int(self.args.seed), index, k)


class TextToImageBenchmark(ImageBenchmark):
  """Text-to-image: square images of `resolution` pixels (--resolution), one request per missing output."""

  resolution: ClassVar[int] = 1024

  def side(self) -> int:
    return int(self.args.resolution or min(self.resolution, self.cfg.max_image_side_gen))

  def infer_kwargs(self) -> dict[str, Any]:
    side = self.side()
    return {**super().infer_kwargs(), "image_shapes": (side, side)}

  def requests(self, item: Item) -> list[Request]:
    side = self.side()
    return [Request([item.data["prompt"]], seed=self.item_seed(item.data["_index"], k), shape=(side, side), tag=path)
            for k, path in self.pending(item)]


class EditBenchmark(ImageBenchmark):
  """Editing: one output per item from its input image(s) and instruction; the output has the size
  of the FIRST input image after the VAE resize (upstream's `editing_image*`: `images[0].size`)."""

  task: ClassVar[str] = "editing"
  contexts: ClassVar[dict[str, CfgContext]] = EDIT_CONTEXTS

  def source_images(self, item: Item) -> list:
    raise NotImplementedError

  def instruction(self, item: Item) -> str:
    return item.data["instruction"]

  def requests(self, item: Item) -> list[Request]:
    index = item.data["_index"]
    inputs = [edit_input(im, self.cfg, self.item_seed(index, 1000 + n)) for n, im in enumerate(self.source_images(item))]
    shape = tuple(int(v) for v in inputs[0].vae.shape[:2])
    return [Request(inputs + [self.instruction(item)], seed=self.item_seed(index), shape=shape, tag=path)
            for _, path in self.pending(item)]


__all__ = ["EDIT_CONTEXTS", "flow_settings", "ImageBenchmark", "TextToImageBenchmark", "EditBenchmark", "THINK_SAMPLING"]
