"""Text-to-image and editing: parity of the CFG flow sampler with upstream (fixture cases t2i/, edit/)."""

import json

import numpy as np
import pytest

from bagel_jax.api import BagelModel
from bagel_jax.config import load_config
from bagel_jax.inference import ImageInput, Inferencer
from bagel_jax.inference.inferencer import to_uint8
from bagel_jax.image import patchify
from bagel_jax.inference.flow import timestep_grid
from tests.conftest import FIXTURE_DIR, rel_err

TOL = 1e-4  # CASES.md: max(1e-4, 10 x the float32 noise floor (9.5e-7 t2i, 2.1e-6 edit))


@pytest.fixture(scope="module")
def inf():
  cfg = load_config(FIXTURE_DIR)
  model = BagelModel(cfg, attention_impl="reference")
  return Inferencer(model, model.load_upstream(FIXTURE_DIR), None)


@pytest.fixture(scope="module")
def settings():
  return json.loads((FIXTURE_DIR / "cases.json").read_text())


def _kw(s):
  return dict(num_timesteps=s["num_timesteps"], timestep_shift=s["timestep_shift"], cfg_text_scale=s["cfg_text_scale"],
              cfg_img_scale=s["cfg_img_scale"], cfg_interval=tuple(s["cfg_interval"]),
              cfg_renorm_type=s["cfg_renorm_type"], cfg_renorm_min=s["cfg_renorm_min"])


@pytest.fixture(scope="module")
def t2i(inf, cases, settings):
  s = settings["t2i"]
  [img] = inf.interleave_inference([cases["t2i/prompt_ids"].tolist()], image_shapes=tuple(s["image_shape"]),
                                   init_noise=[cases["t2i/init_noise"]], record=True, output="array", **_kw(s))
  return img, dict(inf.last)


@pytest.fixture(scope="module")
def edit(inf, cases, settings):
  s = settings["edit"]
  image = ImageInput(vae=cases["edit/image"].transpose(1, 2, 0), vit=cases["edit/vit_image"].transpose(1, 2, 0),
                     vae_eps=cases["edit/vae_eps"][0].transpose(1, 2, 0))
  [img] = inf.interleave_inference([image, cases["edit/instruction_ids"].tolist()],
                                   init_noise=[cases["edit/init_noise"]], record=True, output="array", **_kw(s))
  return img, dict(inf.last)


def test_time_grid_and_cfg_steps(cases, settings, t2i):
  for name in ("t2i", "edit"):
    s = settings[name]
    np.testing.assert_array_equal(timestep_grid(s["num_timesteps"], s["timestep_shift"]), cases[f"{name}/timesteps"])
  ts, _, on = t2i[1]["groups"][0]["schedule"]
  np.testing.assert_array_equal(ts, cases["t2i/step_t"])
  np.testing.assert_array_equal(on, cases["t2i/step_cfg"].astype(bool))


def test_t2i_contexts(t2i):
  where = t2i[1]["where"]
  assert where[(0, "gen")][1:] == (9, 9)  # bos + 7 ids + eos; the image sits at rope id 9
  assert where[(0, "cfg_text")][1:] == (0, 0)  # the empty context
  assert (0, "cfg_img") not in where  # cfg_img_scale 1: not run (upstream prefills it, unused)


@pytest.mark.parametrize("key,index", [("t2i/first_v_cond", 0), ("t2i/first_v_uncond_text", 1)])
def test_t2i_first_branches(t2i, cases, key, index):
  assert rel_err(t2i[1]["groups"][0]["raw"][0, index], cases[key]) < TOL


def test_t2i_velocities_and_final_latent(t2i, cases):
  g = t2i[1]["groups"][0]
  assert rel_err(g["velocities"][0, 0], cases["t2i/first_velocity"]) < TOL
  assert rel_err(g["velocities"][:, 0], cases["t2i/velocities"]) < TOL
  assert rel_err(g["final_latent"][0], cases["t2i/final_latent"]) < TOL


def test_t2i_decoded_image(t2i, cases):
  img, last = t2i
  g = last["groups"][0]
  assert rel_err(g["decoded"][0].transpose(2, 0, 1), cases["t2i/decoded"][0]) < TOL
  assert img.dtype == np.uint8 and img.shape == cases["t2i/image_u8"].shape
  np.testing.assert_array_equal(img, cases["t2i/image_u8"])  # truncation, exactly as upstream


def test_edit_contexts(edit):
  where = edit[1]["where"]
  # gen = [VAE (26), ViT (8), text (7)]; cfg_text = [VAE, ViT] reads gen's row; cfg_img = [text] at rope 0.
  assert where[(0, "gen")][1:] == (41, 9)
  assert where[(0, "cfg_text")] == (where[(0, "gen")][0], 34, 2)
  assert where[(0, "cfg_img")][1:] == (7, 7) and where[(0, "cfg_img")][0] != where[(0, "gen")][0]


@pytest.mark.parametrize("key,index", [("edit/first_v_cond", 0), ("edit/first_v_uncond_text", 1),
                                       ("edit/first_v_uncond_img", 2)])
def test_edit_first_branches(edit, cases, key, index):
  assert rel_err(edit[1]["groups"][0]["raw"][0, index], cases[key]) < TOL


def test_edit_velocities_and_final_latent(edit, cases):
  g = edit[1]["groups"][0]
  assert rel_err(g["velocities"][0, 0], cases["edit/first_velocity"]) < TOL
  assert rel_err(g["velocities"][:, 0], cases["edit/velocities"]) < TOL
  assert rel_err(g["final_latent"][0], cases["edit/final_latent"]) < TOL


def test_edit_decoded_image(edit, cases):
  img, last = edit
  assert rel_err(last["groups"][0]["decoded"][0].transpose(2, 0, 1), cases["edit/decoded"][0]) < TOL
  assert img.dtype == np.uint8 and img.shape == cases["edit/image_u8_out"].shape
  assert_u8_equal_but_at_float_ties(img, cases["edit/decoded"][0].transpose(1, 2, 0), cases["edit/image_u8_out"])


def _levels(decoded):
  """Upstream's float image before its uint8 cast: (x * 0.5 + 0.5).clamp(0, 1) * 255."""
  return np.clip(np.asarray(decoded, np.float32) * np.float32(0.5) + np.float32(0.5), 0, 1) * np.float32(255)


def assert_u8_equal_but_at_float_ties(ours, decoded_ref, want):
  """Equal to upstream's bytes except where upstream's value lies within 1e-3 of a level boundary
  (4e-6 relative): there our 1e-6 decode difference may cross it (one such pixel in the edit case)."""
  v = _levels(decoded_ref)
  tie = np.abs(v - np.round(v)) < 1e-3
  bad = ours != want
  assert not np.any(bad & ~tie), np.argwhere(bad & ~tie)[:5]
  assert np.all(np.abs(ours.astype(int) - want)[bad] == 1) and bad.mean() < 1e-3, bad.sum()


@pytest.mark.parametrize("name,key", [("t2i", "t2i/image_u8"), ("edit", "edit/image_u8_out")])
def test_uint8_cast_truncates_like_upstream(cases, name, key):
  """Upstream's decoded floats through our cast give upstream's bytes exactly (rounding would change
  ~45% of the pixels by one level)."""
  np.testing.assert_array_equal(to_uint8(cases[f"{name}/decoded"][0].transpose(1, 2, 0)), cases[key])


def test_uint8_cast_unit():
  level = lambda v: np.float32(v / 127.5 - 1.0)  # the model output whose level is v
  x = np.array([level(127.9), level(0.7), level(254.6), level(3.4), level(64.5), -1.5, 1.5], np.float32)
  np.testing.assert_array_equal(to_uint8(x), [127, 0, 254, 3, 64, 0, 255])


def test_edit_cond_latent(inf, cases, edit):
  image = ImageInput(vae=cases["edit/image"].transpose(1, 2, 0), vae_eps=cases["edit/vae_eps"][0].transpose(1, 2, 0))
  seg = inf._vae_segment(image, None)
  ref = patchify(cases["edit/cond_latent"][0].transpose(1, 2, 0), 2)
  assert seg.grid == (4, 6)
  assert rel_err(seg.tokens, ref) < TOL


def test_preprocessing_gives_upstreams_input_tensors(inf, cases):
  """Our resize + normalise on upstream's uint8 images give the tensors the parity cases feed:
  the ViT transform of und/image_u8 (sides already multiples of 14: no resize) is und/image; the
  edit image's VAE tensor is edit/image and its ViT tensor (bicubic to 28x42) edit/vit_image."""
  from PIL import Image

  from bagel_jax.inference.inferencer import preprocess_image, to_tensor, vit_resize_rule
  chw = lambda x: np.asarray(x).transpose(2, 0, 1)
  und = Image.fromarray(cases["und/image_u8"].astype(np.uint8))
  np.testing.assert_array_equal(chw(to_tensor(vit_resize_rule(inf.cfg)(und))), cases["und/image"])
  edit = preprocess_image(Image.fromarray(cases["edit/image_u8"].astype(np.uint8)), inf.cfg)
  np.testing.assert_array_equal(chw(edit.vae), cases["edit/image"])
  np.testing.assert_array_equal(chw(edit.vit), cases["edit/vit_image"])
  # A PIL image given to the inferencer goes through the same preprocessing.
  req = inf._build([Image.fromarray(cases["edit/image_u8"].astype(np.uint8)), [7, 8]], False, True, (32, 32), None)
  [vit] = [s for s in req.contexts["gen"] if type(s).__name__ == "VitSegment"]
  np.testing.assert_array_equal(vit.patches, patchify(cases["edit/vit_image"].transpose(1, 2, 0), inf.cfg.vit.patch_size))
