"""Image inputs of upstream's benchmark scripts, as `ImageInput`s for the Inferencer.

Every upstream ImageTransform is scaled here to the checkpoint's position tables (exact for the
release, whose tables are 1024 px for generation and 980 px for the ViT):
- understanding (`eval/vlm/utils.build_transform`, the SFT transform of `data/configs/example.yaml`):
  ViT ImageTransform(980, 378, 14, max_pixels=2_007_040) of the image as loaded;
- editing (`gen_images_mp_*.py`, `gen_images_gedit.py`): VAE ImageTransform(1024, 512, 16) and ViT
  ImageTransform(980, 378, 14) both of the ORIGINAL image; the output has the VAE-resized size.
The VAE posterior draw of an edit input comes from a per-item seed (batch- and device-independent).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

REF_PIXELS = 14 * 14 * 9 * 1024  # upstream ImageTransform's default max_pixels
VLM_MAX_PIXELS = 2_007_040  # example.yaml vlm_sft


def scaled_rule(max_side: int, stride: int, ref_max: int, ref_min: int, ref_pixels: int = REF_PIXELS):
  """Upstream ImageTransform(ref_max, ref_min, stride, ref_pixels) scaled to a table of `max_side` pixels."""
  from bagel_jax.inference.inferencer import ResizeRule
  s = max_side / ref_max
  return ResizeRule(max_side, max(stride, round(ref_min * s / stride) * stride), stride,
                    max_pixels=int(ref_pixels * s * s))


def vlm_vit_rule(cfg):
  return scaled_rule(cfg.max_image_side_vit, cfg.vit.patch_size, 980, 378, VLM_MAX_PIXELS)


def edit_vae_rule(cfg):
  return scaled_rule(cfg.max_image_side_gen, cfg.latent_downsample, 1024, 512)


def edit_vit_rule(cfg):
  return scaled_rule(cfg.max_image_side_vit, cfg.vit.patch_size, 980, 378)


def vit_input(image, cfg):
  """A PIL image -> the ViT-only input of upstream's `model.chat`."""
  from bagel_jax.inference import ImageInput
  from bagel_jax.inference.inferencer import to_tensor
  return ImageInput(vit=to_tensor(vlm_vit_rule(cfg)(image)))


def edit_input(image, cfg, seed: Sequence[int]):
  """A PIL image -> the VAE + ViT input of upstream's editing scripts, with a seeded posterior draw."""
  from bagel_jax.inference import ImageInput
  from bagel_jax.inference.inferencer import to_tensor
  vae = to_tensor(edit_vae_rule(cfg)(image))
  h, w = vae.shape[:2]
  f = cfg.latent_downsample // cfg.latent_patch_size  # the VAE's own downsampling
  eps = np.random.default_rng(list(seed)).standard_normal((h // f, w // f, cfg.vae.z_channels), dtype=np.float32)
  return ImageInput(vae=vae, vit=to_tensor(edit_vit_rule(cfg)(image)), vae_eps=eps)


def initial_noise(seed: Sequence[int], shape: tuple[int, int], cfg) -> np.ndarray:
  """Noise at t = 1 for an image of `shape` pixels: [tokens, p*p*z], from the request's own seed."""
  n = (shape[0] // cfg.latent_downsample) * (shape[1] // cfg.latent_downsample)
  return np.random.default_rng([7919, *seed]).standard_normal((n, cfg.patch_latent_dim), dtype=np.float32)


def crop_to_content(image):
  """Upstream `image.crop(image.getbbox())`: drops all-black borders before saving."""
  box = image.getbbox()
  return image if box is None else image.crop(box)


__all__ = ["scaled_rule", "vlm_vit_rule", "edit_vae_rule", "edit_vit_rule", "vit_input", "edit_input",
           "initial_noise", "crop_to_content"]
