"""Damaged training data is skipped and counted, never fatal, up to `data.max_skip_fraction`.

Parquet with a damaged row group, images that are truncated, empty or decompression bombs are
skipped (counted in `skipped` with their reasons); CMYK, palette and 16-bit images are used.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bagel_jax.config import bagel_tiny
from bagel_jax.data import pipeline, shapes
from bagel_jax.data.sources import DataError, GuardedSource, ParquetSource
from bagel_jax.train import base_config
from bagel_jax.train.validate import check_skipped
from tests.fault_tools import flip_bytes

CFG = bagel_tiny()
TOK = shapes.tokenizer()
CAPTION = json.dumps({"short": "a red square"})


def png(arr: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
  b = io.BytesIO()
  im = Image.fromarray(arr)
  (im.convert(mode) if mode else im).save(b, fmt)
  return b.getvalue()


def bomb(good: bytes, side: int = 40000) -> bytes:
  ihdr = bytearray(good[8:33])
  ihdr[8:16] = struct.pack(">II", side, side)
  ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])))
  return good[:8] + bytes(ihdr) + good[33:]


def data_config(path) -> object:
  c = base_config().data
  c.groups = {"t2i": dict(format="t2i_parquet", path=str(path))}
  c.rows = 2
  c.capacity = dict(tokens=96, und=96, gen=48, vit=32, vae=48, ce=32, vae_images=4)
  c.expected_tokens = 96
  c.vae_max_size, c.vae_min_size, c.vit_max_size, c.vit_min_size = 32, 16, 28, 14
  c.text_cond_dropout = c.vit_cond_dropout = c.vae_cond_dropout = 0.0
  return c


def test_damaged_rows_and_images_are_skipped_and_counted(tmp_path):
  rng = np.random.default_rng(0)
  rgb = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
  good = png(rgb)
  images = [good, good[:50], b"", bomb(good), png(rgb, "CMYK", "JPEG"), png(rgb, "P"),
            png(rgb[..., 0].astype(np.uint16) * 257)]
  pq.write_table(pa.Table.from_pylist([{"image": im, "captions": CAPTION} for im in images]), tmp_path / "a.parquet")
  rows = [{"image": png((rng.random((24, 32, 3)) * 255).astype(np.uint8)), "captions": CAPTION} for _ in range(40)]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet", row_group_size=20, compression="snappy")
  flip_bytes(tmp_path / "b.parquet", 4, 16)  # the first row group's first page header
  src = GuardedSource(ParquetSource(tmp_path, ["image", "captions"]))
  assert "__unreadable__" in src[len(images)]  # a damaged row comes back marked, not raised
  it = iter(pipeline.make_pipeline(data_config(tmp_path), CFG, TOK, seed=0))
  info = {}
  for _ in range(12):
    _, info = next(it)
  reasons = info["skip_reasons"]
  assert reasons.get("SampleError", 0) >= 20, reasons  # the damaged row group: "unreadable record (...)"
  assert any("DecompressionBombError" in k for k in reasons), reasons
  assert any("UnidentifiedImageError" in k or "OSError" in k for k in reasons), reasons
  assert info["skipped"] >= 4 and sum(info["samples_per_group"].values()) > 0


def test_too_many_corrupt_records_stop_the_run_in_one_line():
  info = {"skipped": 90, "samples_per_group": {"0": 150}, "skip_reasons": {"unreadable record (OSError": 90}}
  check_skipped(info, 0.5)  # 37.5% is under the limit
  with pytest.raises(DataError) as e:
    check_skipped(info, 0.25)
  assert str(e.value).startswith("90 of 240 records read were corrupt or unreadable, more than "
                                 "data.max_skip_fraction=0.25") and "\n" not in str(e.value)
  check_skipped({"skipped": 50, "samples_per_group": {"0": 10}}, 0.25)  # too few records yet to judge


def test_damaged_tfds_array_record_files(tmp_path):
  """Flipped bytes inside an ArrayRecord shard: those records are skipped and counted. A truncated
  shard (its index unreadable): one line naming the file, before anything is built."""
  g = dict(format="tfds", name="bagel_shapes/small", split="train", data_dir=str(tmp_path / "tfds"), task="t2i",
           caption_key="caption")
  pipeline.make_source("t2i", g)  # prepares the dataset (256 train records, one shard)
  shard = next((tmp_path / "tfds").rglob("bagel_shapes-train.array_record-*"))
  whole = shard.read_bytes()
  for offset in range(1000, len(whole) // 2, 4096):  # damages about a quarter of the records
    flip_bytes(shard, offset, 8)
  src = pipeline.make_source("t2i", g, build_tfds=False)
  bad = [i for i in range(len(src)) if "__unreadable__" in src[i]]
  assert 0 < len(bad) < len(src) and "Riegeli" in src[bad[0]]["__unreadable__"]
  c = data_config(tmp_path)
  c.groups = {"t2i": g}
  it = iter(pipeline.make_pipeline(c, CFG, TOK, seed=0))
  for _ in range(8):
    _, info = next(it)
  reasons = info["skip_reasons"]
  assert info["skipped"] > 0 and sum(info["samples_per_group"].values()) > 0, info
  assert reasons.get("SampleError", 0) > 0, reasons  # "unreadable record (RuntimeError: Corrupted Riegeli ...)"
  shard.write_bytes(whole[: len(whole) // 2])
  with pytest.raises(DataError) as e:
    pipeline.make_source("t2i", g, build_tfds=False)
  msg = str(e.value)
  assert msg.startswith(f"data group 't2i': {shard}: unreadable ArrayRecord file (") and "\n" not in msg, msg
