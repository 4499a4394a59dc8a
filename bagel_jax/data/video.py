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

import dataclasses
import io
import os
import re
from typing import Any

import numpy as np
from PIL import Image


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
    return idx[:max_num_frames] if max_num_frames > 0 else idx
  raise VideoError(f"frame sampling {sample!r}: expected 'rand', 'middle' or 'fps<rate>'")


def _open(clip: Any):
  try:
    import av
  except ImportError:
    raise VideoError("reading video needs PyAV: pip install -e '.[video]'") from None
  return av.open(io.BytesIO(bytes(clip)) if isinstance(clip, (bytes, bytearray, memoryview)) else str(clip))


def clip_info(clip: Any) -> tuple[int, float]:
  """(number of frames, average frames per second): the container's frame count, else its packets."""
  with _open(clip) as c:
    if not c.streams.video:
      raise VideoError("no video stream")
    s = c.streams.video[0]
    fps = float(s.average_rate or s.guessed_rate or 1.0)
    n = int(s.frames or 0)
    if n <= 0:
      n = sum(1 for p in c.demux(s) if p.size)
  return n, fps


def decode_frames(clip: Any, indices: list[int]) -> list[Image.Image]:
  """The frames at `indices` (display order, repeats allowed) as RGB PIL images, in one decoding pass
  from the start to the last sampled frame (no seeking: exact frame numbers on any container)."""
  wanted = set(indices)
  last = max(indices)
  got: dict[int, Image.Image] = {}
  decoded = 0
  with _open(clip) as c:
    c.streams.video[0].thread_type = "AUTO"  # frame- and slice-threaded decoding
    for frame in c.decode(video=0):
      if decoded in wanted:
        got[decoded] = frame.to_image().convert("RGB")
      decoded += 1
      if decoded > last:
        break
  if len(got) < len(wanted):
    raise VideoError(f"the clip ends after {decoded} decodable frames; frame {last} was sampled")
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
      vlen, fps = clip_info(clip)
      return decode_frames(clip, frame_indices(n, vlen, self.sample, rng, input_fps=fps))
    except VideoError as e:
      raise VideoError(f"{name}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- FFmpeg, the file system and Pillow raise many types
      msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else "corrupt data"
      raise VideoError(f"{name}: cannot decode the clip ({type(e).__name__}: {msg})") from None
