"""A list of frames as one video input: the inferencer's context for it is the training packing of a
video record (frames as consecutive ViT images), checked on the fixture model's keys and values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bagel_jax import layout as L
from bagel_jax.config import bagel_7b_mot
from bagel_jax.image import patchify
from bagel_jax.inference import InferenceError, load_video
from bagel_jax.inference.inferencer import preprocess_frames, preprocess_image
from bagel_jax.model.bagel import Batch, interval_spec
from bagel_jax.model.qwen2_mot import DecoderOptions
from tests.conftest import FIXTURE_DIR, rel_err
from tests.test_data_video import frame_index, make_clip
from tests.test_inference_und import inf  # noqa: F401 (the fixture model's inferencer, a pytest fixture)

TOL = 1e-4



def test_video_context_is_the_training_packing_of_its_frames(inf):
  """The prefilled keys and values of [frames, question], every layer and position, equal those of
  the training forward over the packed sample (three ViT images, then the text)."""
  cfg = inf.cfg
  rng = np.random.default_rng(0)
  frames = [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(3)]
  question = [5, 6, 7]
  req = inf._build([frames, question], False, True, (64, 64), jax.random.key(0))
  assert [type(s).__name__ for s in req.contexts["gen"]] == ["VitSegment"] * 3 + ["TextSegment"]
  cache, where = inf._prefill([req], ["gen"], extra=0)
  row, n, rope = where[(0, "gen")]
  assert rope == 3 + len(question) + 2  # one rope id per frame, then one per text token

  imgs = preprocess_frames(frames, cfg)
  p = cfg.vit.patch_size
  plan = [L.VitImage((x.vit.shape[0] // p, x.vit.shape[1] // p)) for x in imgs] + [L.Text(question)]
  lay = L.pack([[plan]], L.Capacity(tokens=n), cfg.tokens, max_patches_per_side=cfg.vit_max_num_patch_per_side,
               max_latent_size=cfg.max_latent_size)
  empty = jnp.zeros((1, 0, cfg.patch_latent_dim), jnp.float32)
  batch = Batch(layout=lay, vit_patches=jnp.asarray(np.concatenate([patchify(x.vit, p) for x in imgs])[None]),
                vae_latents=empty, noise=empty, timesteps=jnp.zeros((1, 0), jnp.float32))

  @jax.jit
  def training_kv(params, batch):
    bagel = inf.model._bagel(params)
    lay = batch.layout
    opts = DecoderOptions(attention_impl="reference", return_kv=True)
    _, kv = bagel.llm(bagel.embed(batch), (lay.und_indexes, lay.gen_indexes), lay.rope_ids, interval_spec(lay),
                      opts=opts)
    return kv

  k, v = training_kv(inf.params, batch)
  assert rel_err(cache.k[:, row, :n], k[:, 0]) < TOL and rel_err(cache.v[:, row, :n], v[:, 0]) < TOL


def test_frames_share_the_vit_pixel_budget():
  cfg = bagel_7b_mot()
  big = Image.new("RGB", (980, 980), (10, 200, 30))
  assert preprocess_image(big, cfg).vit.shape[:2] == (980, 980)
  # 4 frames: the VAE-resized 976 x 976 -> 980 x 980 ViT image > 1,806,336 / 4 px, so the sides scale
  # by the pixel ratio (upstream's rule): 980 x 0.4702 = 461 -> 462 (33 patches of 14)
  assert preprocess_frames([big], cfg)[0].vit.shape[:2] == (980, 980)  # one frame: the image budget
  four = preprocess_frames([big] * 4, cfg)
  assert four[0].vit.shape[:2] == (462, 462) and four[0].vae.shape[:2] == (976, 976)


def test_load_video(tmp_path, inf):
  clip = make_clip(tmp_path / "clip.mp4", n=12)
  frames = load_video(clip, num_frames=4)  # the middle frame of four intervals: 1, 4, 7, 10
  assert [frame_index(f) for f in frames] == [1, 4, 7, 10]
  (tmp_path / "bad.mp4").write_bytes(b"junk" * 30)
  with pytest.raises(InferenceError, match="bad.mp4: cannot read the video"):
    load_video(tmp_path / "bad.mp4")
  with pytest.raises(InferenceError, match="video file not found"):
    load_video(tmp_path / "gone.mp4")
  with pytest.raises(InferenceError, match="a list must hold token ids or video frames"):
    inf._build([[frames[0], 3]], False, True, (64, 64), jax.random.key(0))


def test_chat_cli_takes_a_video(tmp_path, capsys, monkeypatch):
  from bagel_jax.inference import Inferencer, chat
  seen = []

  class Stub:
    def interleave_inference(self, items, **kw):
      seen.append(items)
      return ["ok"]

  monkeypatch.setattr(Inferencer, "from_checkpoint", classmethod(lambda cls, folder, **kw: Stub()))
  clip = make_clip(tmp_path / "clip.mp4", n=12)
  common = ["--checkpoint", str(FIXTURE_DIR), "--question", "what happens?"]
  assert chat.main(common + ["--video", str(clip), "--frames", "3"]) == 0 and capsys.readouterr().out == "ok\n"
  [[frames, question]] = seen
  # "middle" of 3 intervals of 12 frames: ranges (0, 3), (4, 7), (8, 11) -> 1, 5, 9
  assert [frame_index(f) for f in frames] == [1, 5, 9] and question == "what happens?"
  (tmp_path / "bad.mp4").write_bytes(b"junk" * 30)
  assert chat.main(common + ["--video", str(tmp_path / "bad.mp4")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{tmp_path / 'bad.mp4'}: cannot read the video" in err[0]
