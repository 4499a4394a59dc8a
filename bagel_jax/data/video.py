"""Video clips -> sampled frames, as upstream's `FrameSampler` (`data/video_utils.py`), decoded with PyAV.

`FrameSampler(max_num_frames=12, min_num_frames=8, sample="rand")(clip, rng)` returns a list of RGB
PIL frames:

- a clip file (or its encoded bytes): draw n uniformly in [min, max], then `frame_indices(n, vlen)`:
  split the vlen frames into min(n, vlen) equal intervals (edges `linspace(0, vlen).astype(int)`)
  and take one random frame of each ("rand": in [start, end - 1), upstream's exclusive range, so an
  interval's last frame is never drawn; if any interval is too short for that, a sorted random
  subset of all frames instead) or its middle ("middle"); a clip shorter than n repeats its last
  sampled frame up to n. "fpsX" samples X frames per second at the clip's average rate instead.
- a folder of frames (a path ending in "/"): every file, ordered by the number in `_<n>.jpg`;
  when there are more than n, the same interval sampling picks n of them.

Every draw comes from the caller's numpy Generator (the pipeline's per-record one), never from
global state. A clip that cannot be opened or decoded, has no video stream or no frames, or ends
before a sampled frame raises `VideoError` (the pipeline skips the record and counts it).
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import os
import re
from typing import Any

import numpy as np
from PIL import Image

from bagel_jax.data.sources import DataError


class PyAVMissing(DataError):
  """PyAV is not installed: every video record would fail, so the run stops instead of skipping them."""


class VideoError(ValueError):
  """A clip that cannot give its frames (unreadable, truncated, no frames)."""


def frame_indices(num_frames: int, vlen: int, sample: str, rng: np.random.Generator,
                  input_fps: float = 1.0, max_num_frames: int = -1) -> list[int]:
  """Upstream's `get_frame_indices`: which of the clip's `vlen` frames to take."""
  if vlen <= 0:
    raise VideoError("the clip has no frames")
  if sample in ("rand", "middle"):
    acc = min(num_frames, vlen)
    edges = np.linspace(0, vlen, acc + 1).astype(int)
    ranges = [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:])]
    if sample == "middle":
      idx = [(a + b) // 2 for a, b in ranges]
    elif all(b > a for a, b in ranges):
      idx = [int(rng.integers(a, b)) for a, b in ranges]
    else:  # upstream: random.choice on an empty range raises, and it falls back to a sorted subset
      idx = sorted(int(i) for i in rng.permutation(vlen)[:acc])
    return idx + [idx[-1]] * (num_frames - len(idx))  # a short clip repeats its last frame
  if sample.startswith("fps"):
    try:
      output_fps = float(sample[3:])
    except ValueError:
      raise VideoError(f"frame sampling {sample!r}: expected 'rand', 'middle' or 'fps<rate>'") from None
    delta = 1.0 / output_fps
    seconds = np.arange(delta / 2, vlen / input_fps + delta / 2, delta)
    idx = [int(i) for i in np.around(seconds * input_fps).astype(int) if i < vlen]
    if not idx:
      raise VideoError(f"the clip ({vlen} frames at {input_fps:g} fps) is shorter than half a period of {sample!r}")
    return idx[:max_num_frames] if max_num_frames > 0 else idx
  raise VideoError(f"frame sampling {sample!r}: expected 'rand', 'middle' or 'fps<rate>'")


def _open(clip: Any):
  try:
    import av
  except ImportError:
    raise PyAVMissing("reading video needs PyAV: pip install -e '.[video]'") from None
  return av.open(io.BytesIO(bytes(clip)) if isinstance(clip, (bytes, bytearray, memoryview)) else str(clip))


@dataclasses.dataclass(frozen=True)
class ClipIndex:
  """What one pass over a clip's packets (no decoding) tells: its frames and where decoding can start."""

  num_frames: int
  fps: float
  pts: tuple[int, ...] = ()  # display-order timestamps of the frames (empty: the packets had none)
  keys: tuple[int, ...] = ()  # timestamps of the keyframes


def clip_index(clip: Any) -> ClipIndex:
  with _open(clip) as c:
    if not c.streams.video:
      raise VideoError("no video stream")
    s = c.streams.video[0]
    fps = float(s.average_rate or s.guessed_rate or 1.0)
    n, pts, keys = 0, [], []
    for p in c.demux(s):
      if p.size:
        n += 1
        if p.pts is not None:
          pts.append(int(p.pts))
          if p.is_keyframe:
            keys.append(int(p.pts))
  if len(pts) < n or not keys:
    return ClipIndex(n, fps)
  return ClipIndex(n, fps, tuple(sorted(pts)), tuple(sorted(keys)))


def clip_info(clip: Any) -> tuple[int, float]:
  """(number of frames, average frames per second)."""
  ix = clip_index(clip)
  return ix.num_frames, ix.fps


def _rgb(frame) -> Image.Image:
  return frame.to_image().convert("RGB")


def _decode_in_order(clip: Any, wanted: list[int]) -> dict[int, Image.Image]:
  """Decodes from the first frame to the last wanted one, keeping the wanted ones."""
  got: dict[int, Image.Image] = {}
  want = set(wanted)
  decoded = 0
  with _open(clip) as c:
    c.streams.video[0].thread_type = "AUTO"  # frame- and slice-threaded decoding
    for frame in c.decode(video=0):
      if decoded in want:
        got[decoded] = _rgb(frame)
      decoded += 1
      if decoded > wanted[-1]:
        break
  if len(got) < len(wanted):
    raise VideoError(f"the clip ends after {decoded} decodable frames; frame {wanted[-1]} was sampled")
  return got


def _decode_seeking(clip: Any, wanted: list[int], ix: ClipIndex) -> dict[int, Image.Image] | None:
  """Seeks to the keyframe before each wanted frame that lies past the decoded ones; None if a
  decoded frame's timestamp does not match the index (the caller then decodes in order)."""
  got: dict[int, Image.Image] = {}
  with _open(clip) as c:
    s = c.streams.video[0]
    s.thread_type = "AUTO"
    frames, pos = None, None
    for i in wanted:
      target = ix.pts[i]
      key = ix.keys[max(0, bisect.bisect_right(ix.keys, target) - 1)]
      if frames is None or pos is None or key > pos:
        c.seek(key, stream=s, backward=True, any_frame=False)
        frames = c.decode(s)
      found = None
      for frame in frames:
        if frame.pts is None:
          return None
        pos = int(frame.pts)
        if pos >= target:
          found = frame if pos == target else None
          break
      if found is None:
        return None
      got[i] = _rgb(found)
  return got


def decode_frames(clip: Any, indices: list[int], index: ClipIndex | None = None) -> list[Image.Image]:
  """The frames at `indices` (display order, repeats allowed) as RGB PIL images. With the clip's
  `index` (timestamps and keyframes), decoding starts at the keyframe before each sampled frame
  (far less decoding on long clips); without one, or if the timestamps disagree, it runs from the
  first frame to the last sampled one."""
  wanted = sorted(set(int(i) for i in indices))
  if index is not None and wanted[-1] >= index.num_frames:
    raise VideoError(f"frame {wanted[-1]} was sampled from a clip of {index.num_frames} frames")
  got = _decode_seeking(clip, wanted, index) if index is not None and index.pts else None
  if got is None:
    got = _decode_in_order(clip, wanted)
  return [got[i] for i in indices]


def _frame_number(name: str) -> int:
  m = re.search(r"_(\d+).jpg$", name)
  return int(m.group(1)) if m else -1


def read_frame_folder(folder: str, num_frames: int, sample: str, rng: np.random.Generator) -> list[Image.Image]:
  """Upstream's `read_frames_folder`: every frame file, sampled to num_frames when there are more."""
  names = sorted(sorted(os.listdir(folder)), key=_frame_number)
  if not names:
    raise VideoError("the frame folder is empty")
  frames = []
  for n in names:
    with Image.open(os.path.join(folder, n)) as im:
      frames.append(im.convert("RGB"))
  if len(frames) > num_frames:
    frames = [frames[i] for i in frame_indices(num_frames, len(frames), sample, rng)]
  return frames


@dataclasses.dataclass(frozen=True)
class FrameSampler:
  """Upstream's `FrameSampler` (the vlm_sft group's `frame_sampler_args`: 12 and 8 frames, "rand")."""

  max_num_frames: int = 12
  min_num_frames: int = 8
  sample: str = "rand"

  def __post_init__(self):
    if not 1 <= self.min_num_frames <= self.max_num_frames:
      raise ValueError(f"frame sampler: need 1 <= min_num_frames ({self.min_num_frames}) <= "
                       f"max_num_frames ({self.max_num_frames})")

  def __call__(self, clip: Any, rng: np.random.Generator) -> list[Image.Image]:
    n = int(rng.integers(self.min_num_frames, self.max_num_frames + 1))
    name = clip if isinstance(clip, str) else "<clip bytes>"
    try:
      if isinstance(clip, str) and clip.endswith("/"):
        return read_frame_folder(clip, n, self.sample, rng)
      ix = clip_index(clip)
      return decode_frames(clip, frame_indices(n, ix.num_frames, self.sample, rng, input_fps=ix.fps), ix)
    except VideoError as e:
      raise VideoError(f"{name}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- FFmpeg, the file system and Pillow raise many types
      msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else "corrupt data"
      raise VideoError(f"{name}: cannot decode the clip ({type(e).__name__}: {msg})") from None
