"""Bad input files and requests to the inference tools: one line each, checked before the weights load.

Images of every awkward kind (truncated, empty, decompression bombs; CMYK, 16-bit and palette
images work), converted Orbax weights that were damaged, an unknown --checkpoint, --size not a
multiple of the latent stride, an --out that cannot be written.
"""

from __future__ import annotations

import io
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from bagel_jax.inference import InferenceError, chat, generate, load_image
from tests.conftest import FIXTURE_DIR
from tests.fault_tools import assert_one_line, flip_bytes, snapshot, truncate

TOKENIZER = FIXTURE_DIR.parent / "tokenizer" / "tokenizer.json"


@pytest.fixture
def no_weights(monkeypatch):
  """Loading the weights fails the test: the request had to be refused before."""
  from bagel_jax.inference import Inferencer

  def refuse(*a, **k):
    raise AssertionError("the weights were loaded before the bad request was refused")
  monkeypatch.setattr(Inferencer, "from_checkpoint", classmethod(lambda cls, *a, **k: refuse()))


def _gen(capsys, *argv: str) -> tuple[int, str]:
  rc = generate.main(["--tokenizer", str(TOKENIZER), "--no-progress", "--steps", "3", *argv])
  return rc, capsys.readouterr().err


def test_unknown_checkpoint(tmp_path, capsys, no_weights):
  rc, err = _gen(capsys, "--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "a.png"))
  assert rc == 2 and f"{tmp_path / 'nope'}" in assert_one_line(err, "error: ")
  rc = chat.main(["--checkpoint", str(tmp_path / "nope"), "--question", "x"])
  assert rc == 2 and f"{tmp_path / 'nope'}" in assert_one_line(capsys.readouterr().err, "error: ")


def test_size_not_a_multiple_of_the_stride_before_loading(tmp_path, capsys, no_weights):
  rc, err = _gen(capsys, "--checkpoint", str(FIXTURE_DIR), "--prompt", "x", "--size", "30x32",
                 "--out", str(tmp_path / "a.png"))
  line = assert_one_line(err, "error: ")
  assert rc == 2 and "--size 30x32" in line and "multiples of 8" in line, line


@pytest.mark.parametrize("where", ["missing_folder", "is_a_folder"])
def test_out_checked_before_loading(tmp_path, capsys, no_weights, where):
  out = tmp_path / "no" / "such" / "a.png" if where == "missing_folder" else tmp_path
  rc, err = _gen(capsys, "--checkpoint", str(FIXTURE_DIR), "--prompt", "x", "--size", "16x16", "--out", str(out))
  line = assert_one_line(err, "error: ")
  assert rc == 2 and f"--out {out}" in line, line


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
  b = io.BytesIO()
  im = Image.fromarray(arr)
  (im.convert(mode) if mode else im).save(b, "PNG")
  return b.getvalue()


def bomb_png(png: bytes, width: int, height: int) -> bytes:
  """A PNG whose header claims width x height (a decompression bomb as PIL sees it at open)."""
  import struct
  import zlib
  ihdr = bytearray(png[8:33])  # length, b"IHDR", 13 bytes of data, CRC
  ihdr[8:16] = struct.pack(">II", width, height)
  ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])))
  return png[:8] + bytes(ihdr) + png[33:]


def test_broken_images_are_one_line(tmp_path):
  good = _png((np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8))
  cases = {"truncated.png": good[:60], "empty.png": b"", "text.png": b"not an image at all"}
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
  (tmp_path / "bomb.png").write_bytes(bomb_png(good, 40000, 40000))  # claims 1.6 G pixels in 90 bytes
  for name in [*cases, "bomb.png", "missing.png"]:
    with pytest.raises(InferenceError) as e:
      load_image(tmp_path / name)
    assert str(e.value).startswith(f"{tmp_path / name}: ") and "\n" not in str(e.value), str(e.value)
  with pytest.raises(InferenceError, match=r": is a folder, not an image file$"):
    load_image(tmp_path)


def test_awkward_image_modes_load_as_rgb(tmp_path):
  rgb = (np.random.default_rng(1).random((20, 30, 3)) * 255).astype(np.uint8)
  Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
  Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
  Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # 16-bit
  for name in ("cmyk.jpg", "palette.png", "gray16.png"):
    im = load_image(tmp_path / name)
    assert im.mode == "RGB" and im.size == (30, 20), name
  g = np.asarray(load_image(tmp_path / "gray16.png"))[..., 0].astype(int)
  assert np.abs(g - rgb[..., 0]).max() <= 1  # 16-bit scaled to 8 bits, not clipped to white


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> pathlib.Path:
  from convert.safetensors_to_orbax import convert
  out = tmp_path_factory.mktemp("conv") / "orbax"
  convert(FIXTURE_DIR, out, progress=False)
  return out


@pytest.mark.parametrize("damage", ["truncate_array_file", "flip_metadata", "remove_state"])
def test_damaged_converted_weights_are_one_line(tmp_path, capsys, converted, damage):
  bad = tmp_path / "orbax"
  shutil.copytree(converted, bad)
  state = bad / "state"
  files = sorted((p for p in state.rglob("*") if p.is_file() and "/d/" in p.as_posix()), key=lambda p: p.stat().st_size)
  if damage == "truncate_array_file":
    truncate(files[-1], 16)
  elif damage == "flip_metadata":
    flip_bytes(state / "_METADATA", 20)
  else:
    shutil.rmtree(state)
    (bad / "ema.safetensors").unlink(missing_ok=True)
  before = snapshot(bad)
  rc, err = _gen(capsys, "--checkpoint", str(bad), "--prompt", "x", "--size", "16x16", "--out", str(tmp_path / "a.png"))
  line = assert_one_line(err, "error: ")
  assert rc == 2 and str(bad) in line, line
  assert snapshot(bad) == before and not (tmp_path / "a.png").exists()


def test_load_checkpoint_names_the_folder_given(tmp_path):
  from bagel_jax.weights import CheckpointError
  from bagel_jax.weights.load import load_checkpoint
  (tmp_path / "runs").mkdir()
  with pytest.raises(CheckpointError) as e:
    load_checkpoint(tmp_path / "runs" / "x")
  assert str(e.value).startswith(f"{tmp_path / 'runs' / 'x'}: ") and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("name,damage", [("llm_config.json", "truncate"), ("vit_config.json", "flip"),
                                         ("tokenizer.json", "truncate"), ("ema.safetensors", "truncate"),
                                         ("ae.safetensors", "flip_header")])
def test_damaged_release_files_are_one_line(tmp_path, capsys, name, damage):
  """Every file of a release folder the tools read, truncated or byte-flipped: one line naming it."""
  rel = tmp_path / "release"
  shutil.copytree(FIXTURE_DIR, rel)
  shutil.copy(TOKENIZER, rel / "tokenizer.json")
  f = rel / name
  if damage == "truncate":
    truncate(f, f.stat().st_size // 2)
  else:
    flip_bytes(f, 1 if damage == "flip" else 12, 8)
  before = snapshot(rel)
  rc = generate.main(["--checkpoint", str(rel), "--prompt", "x", "--size", "16x16", "--steps", "3",
                      "--no-progress", "--out", str(tmp_path / "a.png")])
  line = assert_one_line(capsys.readouterr().err, "error: ")
  assert rc == 2 and name in line, line
  assert snapshot(rel) == before and not (tmp_path / "a.png").exists()
