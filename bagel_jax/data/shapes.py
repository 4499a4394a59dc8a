"""The embedded demo data: procedural "shapes" images with captions and question/answer pairs.

Each image (default 32 x 32, black background) holds one to three shapes of one colour and
kind in the cells of a 2 x 2 grid:
- one shape: caption "a red circle at the top left";
- two or three: caption "two blue squares" (cells chosen at random).
Questions (the answer is one word, or two for a position): "what colour are the shapes",
"what shape are they", "how many shapes are there", and for one shape "where is the shape".

`HELD_OUT` lists caption combinations that never occur in the train split: the evaluator asks
the model to generate exactly those (compositional generalisation), and asks questions about
the images of the test split (drawn with another seed, all combinations).

`BagelShapes` is a TFDS builder that renders the dataset into ArrayRecord files without
TensorFlow (images stored as PNG bytes): `tfds.builder("bagel_shapes", data_dir=D)` (configs
"default": 20,000 train / 512 test; "small": 256 / 64). `tokenizer()` is its word vocabulary and
`model_config()` the tiny BAGEL the demo trains.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
from PIL import Image, ImageDraw

from bagel_jax.tokenizer import WordTokenizer

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (60, 90, 240), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three")
QUESTIONS = {"colour": "what colour are the shapes", "shape": "what shape are they",
             "count": "how many shapes are there", "position": "where is the shape"}

# Never in the train split (checked by the evaluator as held-out generation prompts).
HELD_OUT_SINGLE = (("red", "triangle", "bottom right"), ("green", "circle", "top left"),
                   ("blue", "square", "top right"), ("yellow", "triangle", "top left"),
                   ("blue", "circle", "bottom left"), ("green", "square", "bottom right"))
HELD_OUT_COUNT = (("yellow", "circle", 2), ("red", "square", 3), ("green", "triangle", 2))

WORDS = ("a", "at", "the", "top", "bottom", "left", "right", "zero", "one", "two", "three",
         *COLOURS, *SHAPES, *(s + "s" for s in SHAPES),
         "what", "colour", "are", "shapes", "shape", "they", "how", "many", "there", "where", "is", "it",
         ".", "?")


def tokenizer() -> WordTokenizer:
  """The demo's words, and the model's special tokens by name (for the inferencer)."""
  from bagel_jax.tokenizer import SPECIAL_NAMES
  tokens = model_config().tokens
  return WordTokenizer(WORDS, special={name: getattr(tokens, field) for field, name in SPECIAL_NAMES.items()})


@dataclasses.dataclass(frozen=True)
class Scene:
  colour: str
  shape: str
  cells: tuple[int, ...]  # one to three distinct cells
  jitter: tuple[tuple[float, float], ...] = ()

  @property
  def count(self) -> int:
    return len(self.cells)

  def caption(self) -> str:
    if self.count == 1:
      return f"a {self.colour} {self.shape} at the {CELLS[self.cells[0]]}"
    return f"{COUNT_WORDS[self.count]} {self.colour} {self.shape}s"

  def qa(self) -> list[tuple[str, str]]:
    out = [(QUESTIONS["colour"], self.colour), (QUESTIONS["shape"], self.shape),
           (QUESTIONS["count"], COUNT_WORDS[self.count])]
    if self.count == 1:
      out.append((QUESTIONS["position"], CELLS[self.cells[0]]))
    return out

  def key(self):
    return (self.colour, self.shape, CELLS[self.cells[0]]) if self.count == 1 else (self.colour, self.shape, self.count)

  def held_out(self) -> bool:
    return self.key() in (HELD_OUT_SINGLE if self.count == 1 else HELD_OUT_COUNT)


def random_scene(rng: np.random.Generator) -> Scene:
  colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
  shape = SHAPES[int(rng.integers(len(SHAPES)))]
  count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
  cells = tuple(sorted(int(c) for c in rng.choice(4, size=count, replace=False)))
  jitter = tuple((float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))) for _ in cells)
  return Scene(colour, shape, cells, jitter)


def scene_from_prompt_key(key) -> Scene:
  colour, shape, x = key
  cells = (CELLS.index(x),) if isinstance(x, str) else tuple(range(x))
  return Scene(colour, shape, cells)


def render(scene: Scene, size: int = 32, supersample: int = 4) -> Image.Image:
  """Draws the scene (antialiased by supersampling) on black."""
  s = size * supersample
  img = Image.new("RGB", (s, s), (0, 0, 0))
  draw = ImageDraw.Draw(img)
  cell = s / 2
  r = 0.17 * s  # about 11 pixels across at 32 x 32
  jit = 0.05 * s
  colour = COLOURS[scene.colour]
  for i, c in enumerate(scene.cells):
    jx, jy = scene.jitter[i] if scene.jitter else (0.0, 0.0)
    cx = (c % 2 + 0.5) * cell + jx * jit
    cy = (c // 2 + 0.5) * cell + jy * jit
    if scene.shape == "circle":
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif scene.shape == "square":
      q = 0.9 * r
      draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=colour)
    else:
      draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
  return img.resize((size, size), Image.BOX)


def png_bytes(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def examples(n: int, seed: int, size: int, exclude_held_out: bool):
  rng = np.random.default_rng(seed)
  i = 0
  while i < n:
    scene = random_scene(rng)
    if exclude_held_out and scene.held_out():
      continue
    yield i, {
        "image": png_bytes(render(scene, size)),
        "caption": scene.caption(),
        "qa": json.dumps(scene.qa()),
        "objects": json.dumps({"colour": scene.colour, "shape": scene.shape, "cells": list(scene.cells)}),
    }
    i += 1


def model_config(image_size: int = 32):
  """The demo's tiny BAGEL: 4-layer MoT LLM (width 128), 2-layer ViT (patch 8), a 2x VAE (z = 4) with
  4 x 4 latent patches, so a token is 8 x 8 pixels and 64 numbers, as upstream's (16 px, 2 x 2 x 16)."""
  from bagel_jax.config import BagelConfig, LLMConfig, SpecialTokens, VAEConfig, ViTConfig
  n = len(WORDS)
  vocab = -(-(n + 4) // 8) * 8
  return BagelConfig(
      llm=LLMConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2),
      vit=ViTConfig(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_hidden_layers=2, patch_size=8),
      vae=VAEConfig(resolution=image_size, ch=32, ch_mult=(1, 1), num_res_blocks=0, z_channels=4, downsample=2,
                    scale_factor=1.0, shift_factor=0.0),
      tokens=SpecialTokens(bos_token_id=n, eos_token_id=n + 1, start_of_image=n + 2, end_of_image=n + 3),
      latent_patch_size=4,
      max_latent_size=image_size // 8,
      vit_max_num_patch_per_side=image_size // 8,
  )


# ----------------------------------------------------------------------------- the TFDS builder
def _builder_cls():
  import tensorflow_datasets as tfds

  @dataclasses.dataclass
  class ShapesConfig(tfds.core.BuilderConfig):
    train: int = 20_000
    test: int = 512
    image_size: int = 32

  class BagelShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural coloured shapes with captions and question/answer pairs (bagel_jax demo)."""

    code_path = __import__("etils.epath").epath.Path(__file__)  # TFDS' package lookup fails on editable installs
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [
        ShapesConfig(name="default", description="20,000 train / 512 test images, 32 x 32"),
        ShapesConfig(name="small", description="256 train / 64 test images (tests)", train=256, test=64),
    ]

    def _info(self):
      f = tfds.features
      return tfds.core.DatasetInfo(
          builder=self,
          features=f.FeaturesDict({
              "image": f.Tensor(shape=(), dtype=np.object_),  # PNG bytes (no TF needed)
              "caption": f.Text(),
              "qa": f.Text(),  # JSON [[question, answer], ...]
              "objects": f.Text(),  # JSON {"colour", "shape", "cells"}
          }),
          description="Procedural coloured shapes for the bagel_jax CPU demo.",
      )

    def _split_generators(self, dl_manager):
      c = self.builder_config
      return {"train": examples(c.train, 0, c.image_size, exclude_held_out=True),
              "test": examples(c.test, 1, c.image_size, exclude_held_out=False)}

    def _generate_examples(self, *args):  # the generators above are passed directly
      raise NotImplementedError

  # Module-level names, so that pickle (grain's worker processes) refers to the classes instead of
  # rebuilding them by value, which would register the dataset name with TFDS a second time.
  for c in (ShapesConfig, BagelShapes):
    c.__qualname__ = c.__name__
  return ShapesConfig, BagelShapes


ShapesConfig, BagelShapes = _builder_cls()
