"""Video records (upstream's vlm_sft `video` + `<video>`): the frame sampler, PyAV decoding of clips
made here, packing of a clip's frames as upstream's `pack_sequence` does, bad clips skipped and
counted; and upstream's VAE video frames for generation (`_add_video` plans, `frame_delta`)."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from PIL import Image

from bagel_jax import layout as L
from bagel_jax.data import samples as S
from bagel_jax.data import video as V
from bagel_jax.data.sources import DataError
from bagel_jax.data.transforms import ImageTransform
from tests.test_data_formats import CFG, TOK, data_config, make_pipeline
from tests.test_layout import _upstream_dense_mask

STEP = 20  # frame i is one flat colour (STEP * (i % 12), 2 * STEP * (i // 12), 128): its index survives the codec


def make_clip(path, n: int = 12, side: int = 32, fmt: str | None = None, codec: str = "mpeg4", gop: int = 12,
              b_frames: int = 0):
  """An n-frame clip of flat coloured squares (12 fps), a keyframe every `gop` frames."""
  with av.open(str(path), "w", format=fmt) as c:
    s = c.add_stream(codec, rate=12)
    s.width = s.height = side
    s.pix_fmt = "yuv420p"
    s.codec_context.gop_size = gop
    s.codec_context.max_b_frames = b_frames
    c.start_encoding()  # headers even for a clip of no frames
    for i in range(n):
      a = np.empty((side, side, 3), np.uint8)
      a[:] = (STEP * (i % 12), 2 * STEP * (i // 12), 128)
      for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return path


def frame_index(img) -> int:
  r, g = np.asarray(img, np.float32)[..., :2].reshape(-1, 2).mean(0)
  return int(round(r / STEP)) + 12 * int(round(g / (2 * STEP)))


def test_frame_indices_follow_upstream():
  rng = np.random.default_rng(0)
  # 12 frames into 8 intervals: edges linspace(0, 12, 9).astype(int) = 0 1 3 4 6 7 9 10 12
  assert V.frame_indices(8, 12, "middle", rng) == [0, 1, 3, 4, 6, 7, 9, 10]
  # 30 frames into 10 intervals of 3: "rand" draws in [start, end - 1), i.e. 3k or 3k + 1
  for seed in range(5):
    idx = V.frame_indices(10, 30, "rand", np.random.default_rng(seed))
    assert all(i - 3 * k in (0, 1) for k, i in enumerate(idx))
  assert len({tuple(V.frame_indices(10, 30, "rand", np.random.default_rng(s))) for s in range(5)}) > 1
  # an interval too short for a draw: a sorted random subset; a short clip repeats its last frame
  idx = V.frame_indices(8, 12, "rand", np.random.default_rng(1))
  assert idx == sorted(idx) and len(set(idx)) == 8 and max(idx) < 12
  assert V.frame_indices(5, 3, "rand", rng) == [0, 1, 2, 2, 2]
  # "fps1" on 10 frames at 5 fps: seconds 0.5, 1.5 -> frames around(2.5) = 2, around(7.5) = 8
  assert V.frame_indices(0, 10, "fps1", rng, input_fps=5.0) == [2, 8]
  with pytest.raises(V.VideoError, match="no frames"):
    V.frame_indices(8, 0, "rand", rng)
  with pytest.raises(V.VideoError, match="shorter than half a period"):
    V.frame_indices(0, 1, "fps1", rng, input_fps=30.0)


def test_frame_folder(tmp_path):
  """A `video` path ending in "/": frame files ordered by their number (f_10 after f_9), sampled."""
  folder = tmp_path / "clip"
  folder.mkdir()
  for i in range(12):
    a = np.zeros((16, 16, 3), np.uint8)
    a[:] = (STEP * i, 0, 128)
    Image.fromarray(a).save(folder / f"frame_{i}.jpg", quality=95)
  frames = V.FrameSampler(3, 3, "middle")(str(folder) + "/", np.random.default_rng(0))
  assert [frame_index(f) for f in frames] == [1, 5, 9]  # the middles of (0, 3), (4, 7), (8, 11)
  assert len(V.FrameSampler(20, 20)(str(folder) + "/", np.random.default_rng(0))) == 12  # fewer: all of them


def test_sampler_decodes_the_sampled_frames(tmp_path):
  clip = make_clip(tmp_path / "clip.mp4")
  assert V.clip_info(clip) == (12, 12.0)
  sampler = V.FrameSampler(max_num_frames=12, min_num_frames=8)
  counts = set()
  for seed in range(4):
    twin = np.random.default_rng(seed)  # the same draws, made by hand
    n = int(twin.integers(8, 13))
    want = V.frame_indices(n, 12, "rand", twin)
    frames = sampler(str(clip), np.random.default_rng(seed))
    assert [frame_index(f) for f in frames] == want and frames[0].size == (32, 32)
    counts.add(len(frames))
  assert len(counts) > 1 and counts <= set(range(8, 13))
  # clip bytes work too; same generator state, same frames
  a = sampler(clip.read_bytes(), np.random.default_rng(7))
  b = sampler(str(clip), np.random.default_rng(7))
  assert [frame_index(f) for f in a] == [frame_index(f) for f in b]
  with pytest.raises(ValueError, match="min_num_frames"):
    V.FrameSampler(4, 8)


@pytest.mark.parametrize("codec,ext,b_frames", [("mpeg4", "avi", 0), ("libx264", "mp4", 2), ("mpeg4", "mkv", 2)])
def test_seeking_to_keyframes_decodes_the_same_frames(tmp_path, codec, ext, b_frames):
  clip = make_clip(tmp_path / f"clip.{ext}", n=24, codec=codec, gop=4, b_frames=b_frames)
  ix = V.clip_index(clip)
  assert ix.num_frames == 24 and len(ix.pts) == 24 and 4 <= len(ix.keys) < 24
  want = [1, 2, 9, 14, 15, 22, 22]
  assert V._decode_seeking(clip, sorted(set(want)), ix) is not None  # the keyframe path is taken
  seek, in_order = V.decode_frames(clip, want, ix), V.decode_frames(clip, want)
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(seek, in_order))
  assert [frame_index(f) for f in in_order] == want


def test_three_frame_clip_packs_exactly_as_upstream(tmp_path):
  make_clip(tmp_path / "clip.mp4", n=3)
  rec = {"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nwhat colour"},
                                                 {"from": "gpt", "value": "green"}]}
  b = S.Builders(TOK, None, ImageTransform(28, 14, 14), 14, 8)
  load = S.video_file_loader(str(tmp_path), V.FrameSampler(3, 3))
  s = S.vlm_sample(rec, b, np.random.default_rng(0), load_video=load)
  assert [frame_index(np.asarray(x) * 127.5 + 127.5) for x in s.vit] == [0, 1, 2]  # frames in clip order
  lay = L.pack([[s.plan]], L.Capacity(tokens=48), CFG.tokens, max_patches_per_side=8, max_latent_size=8)

  # Upstream by hand: "<video>" -> "<image>" x 3; change_format gives three images then the text
  # (empty text between the placeholders is dropped); pack_sequence gives each vit_image item
  # <|vision_start|> + 2x2 patches + <|vision_end|> at one rope id, then curr_rope_id += 1, mode "full";
  # each text item <|im_start|> + ids + <|im_end|>, one rope id per token, mode "causal".
  t = CFG.tokens
  q, a = TOK.encode("what colour"), TOK.encode("green")
  ids, rope, vit_pos, ce_idx, ce_lab, splits = [], [], [], [], [], []
  for f in range(3):
    ids += [t.start_of_image] + [None] * 4 + [t.end_of_image]
    rope += [f] * 6
    vit_pos += [0, 1, 8, 9]  # row * max_patches_per_side + col
    splits.append((6, "full"))
  r = 3
  for text, loss in ((q, False), (a, True)):
    start = len(ids)
    ids += [t.bos_token_id] + text + [t.eos_token_id]
    rope += list(range(r, r + len(text) + 2))
    r += len(text) + 2
    if loss:
      ce_idx += list(range(start, start + len(text) + 1))
      ce_lab += text + [t.eos_token_id]
    splits.append((len(text) + 2, "causal"))
  n = len(ids)
  text_pos = [i for i, x in enumerate(ids) if x is not None]
  np.testing.assert_array_equal(lay.rope_ids[0, :n], rope)
  np.testing.assert_array_equal(lay.text_ids[0, text_pos], [ids[i] for i in text_pos])
  np.testing.assert_array_equal(lay.vit_indexes[0, :12], [i for i, x in enumerate(ids) if x is None])
  np.testing.assert_array_equal(lay.vit_position_ids[0, :12], vit_pos)
  np.testing.assert_array_equal(lay.ce_indexes[0, :len(ce_idx)], ce_idx)
  np.testing.assert_array_equal(lay.ce_labels[0, :len(ce_lab)], ce_lab)
  assert int(np.sum(np.asarray(lay.ce_weights) > 0)) == len(ce_idx)
  np.testing.assert_array_equal(L.dense_mask_np(lay)[:n, :n], _upstream_dense_mask([splits]))


def test_video_placeholder_only_in_the_first_turn():
  conv = [{"from": "human", "value": "look <video> here"}, {"from": "gpt", "value": "ok"}]
  out = S.video_placeholders(conv, 2)
  assert out[0]["value"] == "look <image><image> here" and conv[0]["value"] == "look <video> here"
  with pytest.raises(S.SampleError, match="first conversation turn"):  # upstream raises here too
    S.video_placeholders([{"from": "human", "value": "hi"}, {"from": "human", "value": "<video>"}], 2)


def test_bad_clips_are_skipped_and_counted(tmp_path):
  good = make_clip(tmp_path / "good.mp4", n=6)
  (tmp_path / "cut.mp4").write_bytes(good.read_bytes()[: good.stat().st_size * 4 // 5])  # truncated
  (tmp_path / "junk.mp4").write_bytes(b"not a video" * 20)
  make_clip(tmp_path / "empty.avi", n=0)  # a video stream with zero frames
  conv = [{"from": "human", "value": "<video>\nwhat colour"}, {"from": "gpt", "value": "green"}]
  lines = [{"video": v, "conversations": conv} for v in ("good.mp4", "cut.mp4", "junk.mp4", "empty.avi", "gone.mp4")]
  path = tmp_path / "videos.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  group = dict(format="vlm_jsonl", path=str(path), image_dir=str(tmp_path), max_num_frames=3, min_num_frames=2)
  sampler = V.FrameSampler(3, 2)
  for name, why in (("cut.mp4", "cannot decode|ends after|no video stream"), ("junk.mp4", "cannot decode"),
                    ("empty.avi", "has no frames"), ("gone.mp4", "No such file")):
    with pytest.raises(V.VideoError, match=f"{name}: .*({why})"):
      sampler(str(tmp_path / name), np.random.default_rng(0))
  it = iter(make_pipeline(data_config({"video": group})))
  arrays, info = next(it)
  # one good record in five: every bad one is skipped and counted under its reason, none is fatal
  assert info["samples"] >= 2 and info["skip_reasons"] == {"VideoError": info["skipped"]}, info
  assert info["skipped"] >= 4 * (info["samples"] - 1)
  lay = arrays["layout"]
  nv = int(np.sum(np.asarray(lay.vit_indexes) < lay.length))
  assert nv > 0 and nv % 4 == 0  # whole 2x2-patch frames
  with pytest.raises(DataError, match="'video'.*min_num_frames"):
    make_pipeline(data_config({"video": dict(group, min_num_frames=5)}))
  with pytest.raises(DataError, match="'video'.*frame sampling"):
    make_pipeline(data_config({"video": dict(group, frame_sample="every")}))


def test_video_frames_for_generation_pack_as_upstream():
  """Upstream's `_add_video` plan (VAE frames with split_start / split_end / frame_delta) through
  `pack_sequence`, worked by hand: one split per clip, rope ids advancing by the frame gaps."""
  import jax
  from bagel_jax.train.step import image_timesteps
  b = S.Builders(TOK, ImageTransform(32, 16, 8), None, 14, 8)
  frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(3)]  # 2 x 2 latent tokens each
  sb = S.SampleBuilder(b).text("a red square", loss=False, enable_cfg=False)
  sb.video(frames[:2], [0, 3], need_loss=False, need_vae=True, enable_cfg=False)
  sb.video(frames, [4, 6, 9], need_loss=True, need_vae=False).text("the shapes", loss=False, enable_cfg=False)
  one = S.SampleBuilder(b).text("one", loss=False, enable_cfg=False).video(frames[:1], [7], True, False)
  s0, s1 = sb.build(np.random.default_rng(0)), one.build(np.random.default_rng(0))
  assert [i.frame_delta for i in s0.plan[1:6]] == [3, None, 2, 3, None] and len(s0.vae) == 5
  lay = L.pack([[s0.plan, s1.plan]], L.Capacity(tokens=96), CFG.tokens, max_patches_per_side=8, max_latent_size=8)
  q, end, o = (len(TOK.encode(x)) + 2 for x in ("a red square", "the shapes", "one"))
  r = q
  rope = list(range(q))
  rope += [r] * 6 + [r + 3] * 6  # clean clip: frame 0 at r, +3; last frame +1 (a clean image)
  rope += [r + 4] * 6 + [r + 6] * 6 + [r + 9] * 6  # target clip: +2, +3; last frame no advance (loss)
  rope += list(range(r + 9, r + 9 + end))
  rope += list(range(o)) + [o] * 6  # sample 2 restarts at 0
  n = len(rope)
  np.testing.assert_array_equal(lay.rope_ids[0, :n], rope)
  # modes: a multi-frame target clip is "full" (it has frame_delta), a one-frame target "noise"
  ref = _upstream_dense_mask([[(q, "causal"), (12, "full"), (18, "full"), (end, "causal")],
                              [(o, "causal"), (6, "noise")]])
  np.testing.assert_array_equal(L.dense_mask_np(lay)[:n, :n], ref)
  np.testing.assert_array_equal(lay.vae_image_noisy[0, :6], [0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(lay.vae_image_timestep[0, :6], [0, 0, 2, 2, 2, 5])
  t = np.asarray(image_timesteps(jax.random.key(0), lay, lay.vae_image_noisy.shape, 1.0))[0]
  assert t[0] == t[1] == 0 and t[2] == t[3] == t[4] > 0 and t[5] > 0 and t[5] != t[2]  # one t per clip

  # A CFG-dropped frame advances the rope id by one (upstream); the clip's split holds the kept frames.
  clip = [L.VaeImage((2, 2), split_start=True, split_end=False, frame_delta=3), L.RopeSkip(),
          L.VaeImage((2, 2), split_start=False, split_end=True), L.Text([7])]
  lay = L.pack([[clip]], L.Capacity(tokens=32), CFG.tokens, max_patches_per_side=8, max_latent_size=8)
  np.testing.assert_array_equal(lay.rope_ids[0, :15], [0] * 6 + [4] * 6 + [5, 6, 7])
  np.testing.assert_array_equal(L.dense_mask_np(lay)[:15, :15], _upstream_dense_mask([[(12, "full"), (3, "causal")]]))


def test_missing_pyav_stops_the_run_instead_of_skipping_every_clip(monkeypatch):
  """Without PyAV no video record can be read: that is one error, not a skipped record per clip."""
  import builtins

  from bagel_jax.data import video

  real_import = builtins.__import__

  def no_av(name, *args, **kwargs):
    if name == "av":
      raise ImportError("No module named 'av'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_av)
  with pytest.raises(video.PyAVMissing, match=r"needs PyAV"):
    video._open(b"not a clip")
