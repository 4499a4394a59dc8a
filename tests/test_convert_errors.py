"""Bad input to the converters: a one-line error naming the file or key, and no output folder left behind."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bagel_jax.weights.safetensors_io import SafetensorsWriter, read_safetensors
from convert.orbax_to_safetensors import export, main as export_main
from convert.safetensors_to_orbax import convert, main as convert_main, main_wrapper

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures" / "bagel_tiny_a"
REPO = pathlib.Path(__file__).resolve().parent.parent
ST_NAME = {np.dtype("float32"): "F32"}


def _st(x: np.ndarray) -> str:
  return ST_NAME.get(x.dtype, "BF16")


def release_copy(tmp_path: pathlib.Path) -> pathlib.Path:
  src = tmp_path / "release"
  shutil.copytree(FIXTURE_DIR, src)
  return src


def rewrite(path: pathlib.Path, edit) -> None:
  """Rewrites a safetensors file after `edit(dict of tensors)`."""
  t = read_safetensors(path)
  edit(t)
  w = SafetensorsWriter(path, [(k, v.shape, _st(v)) for k, v in sorted(t.items())])
  for k, v in sorted(t.items()):
    w.write(k, v)
  w.close()


def run_convert(argv, capsys) -> tuple[int, str]:
  rc = main_wrapper(convert_main, [*map(str, argv), "--quiet"])
  return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, *names: str) -> None:
  assert rc != 0
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for n in names:
    assert n in lines[0], (n, lines[0])


def assert_nothing_left(dst: pathlib.Path) -> None:
  assert not dst.exists()
  assert not list(dst.parent.glob(f".{dst.name}.*")), list(dst.parent.iterdir())


# ----------------------------------------------------------------------------- bad source folders
def test_missing_source_files(tmp_path, capsys):
  dst = tmp_path / "out"
  rc, err = run_convert(["--src", tmp_path / "nope", "--dst", dst], capsys)
  assert_one_line_error(rc, err, "nope")
  src = release_copy(tmp_path)
  (src / "ae.safetensors").unlink()
  rc, err = run_convert(["--src", src, "--dst", dst], capsys)
  assert_one_line_error(rc, err, "ae.safetensors", "not found")
  (src / "ema.safetensors").unlink()
  rc, err = run_convert(["--src", src, "--dst", dst], capsys)
  assert_one_line_error(rc, err, "ema.safetensors", "not found")
  shutil.copy(FIXTURE_DIR / "ae.safetensors", src)
  shutil.copy(FIXTURE_DIR / "ema.safetensors", src)
  (src / "llm_config.json").unlink()
  rc, err = run_convert(["--src", src, "--dst", dst], capsys)
  assert_one_line_error(rc, err, "llm_config.json")
  assert_nothing_left(dst)


def test_missing_shard(tmp_path, capsys):
  src = release_copy(tmp_path)
  ema = src / "ema.safetensors"
  keys = sorted(read_safetensors(ema))
  (src / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: "model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors"
                      for i, k in enumerate(keys)}}))
  ema.rename(src / "model-00001-of-00002.safetensors")
  dst = tmp_path / "out"
  rc, err = run_convert(["--src", src, "--dst", dst], capsys)
  assert_one_line_error(rc, err, "model-00002-of-00002.safetensors")
  assert_nothing_left(dst)


def test_truncated_safetensors(tmp_path, capsys):
  src = release_copy(tmp_path)
  ema = src / "ema.safetensors"
  ema.write_bytes(ema.read_bytes()[:-1000])
  dst = tmp_path / "out"
  rc, err = run_convert(["--src", src, "--dst", dst], capsys)
  assert_one_line_error(rc, err, "ema.safetensors")
  ema.write_bytes(b"\x10\x00")  # not even a header length
  rc, err = run_convert(["--src", src, "--dst", dst], capsys)
  assert_one_line_error(rc, err, "ema.safetensors")
  assert_nothing_left(dst)


def _lying_header(path: pathlib.Path, key: str, shift: int) -> None:
  raw = path.read_bytes()
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  b, e = header[key]["data_offsets"]
  header[key]["data_offsets"] = [b + shift, e + shift]  # same size, wrong place: overlaps a neighbour
  new = json.dumps(header, separators=(",", ":")).encode()
  new += b" " * (-len(new) % 8)
  path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def test_header_offsets_that_lie(tmp_path, capsys):
  src = release_copy(tmp_path)
  key = "language_model.model.layers.1.mlp.up_proj.weight"
  _lying_header(src / "ema.safetensors", key, 64)
  dst = tmp_path / "out"
  rc, err = run_convert(["--src", src, "--dst", dst], capsys)
  assert_one_line_error(rc, err, "ema.safetensors")
  assert "offset" in err.lower()
  assert_nothing_left(dst)


def test_header_offsets_that_lie_are_caught_by_our_reader_too(tmp_path):
  from bagel_jax.weights.safetensors_io import SafetensorsFile
  from bagel_jax.weights import CheckpointError

  path = tmp_path / "ema.safetensors"
  shutil.copy(FIXTURE_DIR / "ema.safetensors", path)
  key = "language_model.model.layers.1.mlp.up_proj.weight"
  _lying_header(path, key, 64)
  with pytest.raises(CheckpointError, match="ema.safetensors.*offsets"):
    SafetensorsFile(path)
  raw = bytearray((FIXTURE_DIR / "ema.safetensors").read_bytes())
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  header[key]["shape"] = [1, 2]  # offsets no longer match the shape
  new = json.dumps(header).encode()
  path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
  with pytest.raises(CheckpointError, match=f"ema.safetensors: key {key} has header offsets"):
    SafetensorsFile(path)


def test_missing_key(tmp_path, capsys):
  src = release_copy(tmp_path)
  key = "language_model.model.layers.0.self_attn.k_norm_moe_gen.weight"
  rewrite(src / "ema.safetensors", lambda t: t.pop(key))
  dst = tmp_path / "out"
  rc, err = run_convert(["--src", src, "--dst", dst], capsys)
  assert_one_line_error(rc, err, "ema.safetensors", "missing key", key)
  assert_nothing_left(dst)


def test_unexpected_key_refused_unless_allow_extra(tmp_path, capsys):
  src = release_copy(tmp_path)
  rewrite(src / "ae.safetensors", lambda t: t.update({"decoder.extra.weight": np.ones((3,), np.float32)}))
  dst = tmp_path / "out"
  rc, err = run_convert(["--src", src, "--dst", dst], capsys)
  assert_one_line_error(rc, err, "ae.safetensors", "unexpected key", "decoder.extra.weight")
  assert_nothing_left(dst)
  rc, _ = run_convert(["--src", src, "--dst", dst, "--allow-extra"], capsys)
  assert rc == 0 and (dst / "state").is_dir()


def test_wrong_shape(tmp_path, capsys):
  src = release_copy(tmp_path)
  key = "language_model.model.layers.1.self_attn.q_proj.weight"

  def edit(t):
    t[key] = t[key][:, :-1].copy()
  rewrite(src / "ema.safetensors", edit)
  dst = tmp_path / "out"
  rc, err = run_convert(["--src", src, "--dst", dst], capsys)
  assert_one_line_error(rc, err, "ema.safetensors", key, "shape")
  assert_nothing_left(dst)


def test_wrong_dtype(tmp_path, capsys):
  src = release_copy(tmp_path)
  key = "connector.fc1.bias"

  def edit(t):
    t[key] = t[key].astype(np.float32)
  rewrite(src / "ema.safetensors", edit)
  dst = tmp_path / "out"
  rc, err = run_convert(["--src", src, "--dst", dst], capsys)
  assert_one_line_error(rc, err, "ema.safetensors", key, "dtype")
  assert_nothing_left(dst)


def test_destination_exists_refused_unless_overwrite(tmp_path, capsys):
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  rc, err = run_convert(["--src", FIXTURE_DIR, "--dst", dst], capsys)
  assert_one_line_error(rc, err, str(dst), "exists")
  assert (dst / "keep.txt").read_text() == "mine"
  # --overwrite replaces only what the project wrote: a user's file is refused by name, and kept
  rc, err = run_convert(["--src", FIXTURE_DIR, "--dst", dst, "--overwrite"], capsys)
  assert_one_line_error(rc, err, str(dst), "keep.txt", "not written by bagel_jax")
  assert (dst / "keep.txt").read_text() == "mine"
  (dst / "keep.txt").unlink()
  rc, _ = run_convert(["--src", FIXTURE_DIR, "--dst", dst, "--overwrite"], capsys)  # an empty folder is replaced
  assert rc == 0 and (dst / "state").is_dir()
  assert not list(tmp_path.glob(".out.*"))
  # the export refuses too
  back = tmp_path / "back"
  back.mkdir()
  rc = main_wrapper(export_main, ["--src", str(dst), "--dst", str(back), "--quiet"])
  assert_one_line_error(rc, capsys.readouterr().err, str(back), "exists")
  rc = main_wrapper(export_main, ["--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "b2"), "--quiet"])
  assert_one_line_error(rc, capsys.readouterr().err, "nothing")
  assert_nothing_left(tmp_path / "b2")


# ----------------------------------------------------------------------------- interrupted runs
def test_sigterm_mid_conversion_leaves_nothing(tmp_path):
  """In-process: the converter's own SIGTERM handler stops the writer and restores the old handler."""
  dst = tmp_path / "out"
  seen = []

  def on_piece(name, nbytes):
    seen.append(name)
    if len(seen) == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    if len(seen) >= 5:
      # Every later piece is slow too, until the main thread has taken the signal and cancelled the
      # writer (a loaded machine may not run the main thread for a while): the signal always lands
      # mid-conversion, never after it.
      time.sleep(0.5)
  with pytest.raises(KeyboardInterrupt):
    convert(FIXTURE_DIR, dst, progress=False, on_piece=on_piece)
  assert len(seen) >= 5  # it stopped while writing
  assert_nothing_left(dst)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_interrupted_export_leaves_nothing(tmp_path):
  conv = tmp_path / "orbax"
  convert(FIXTURE_DIR, conv, progress=False)
  dst = tmp_path / "back"

  def stop(key, n):
    if key.startswith("language_model.model.layers.1"):
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    export(conv, dst, progress=False, on_tensor=stop)
  assert_nothing_left(dst)


# The child first puts back Python's own signal handling, as a process started from a user's shell has
# it: a test worker's SIGINT can be ignored, and an ignored disposition is inherited across exec (it
# once made the child run the whole conversion through the signal under the parallel suite).
AS_FROM_A_SHELL = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "signal.signal(signal.SIGTERM, signal.SIG_DFL); "
                   "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM}); ")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "SIGTERM"])
def test_signal_to_the_command_line_tool(tmp_path, sig):
  """A real process (Python's own signal handlers, as a user's) gets Ctrl-C or SIGTERM mid-way: exit
  status 130, one line, no partial checkpoint."""
  dst = tmp_path / "out"
  code = (AS_FROM_A_SHELL + "import sys, time; from convert.safetensors_to_orbax import convert, main_wrapper; "
          "slow = lambda k, n: time.sleep(0.05); "  # slow the writer down so the signal lands mid-way
          f"sys.exit(main_wrapper(lambda a: convert({str(FIXTURE_DIR)!r}, {str(dst)!r}, progress=False, "
          "on_piece=slow), []))")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and p.poll() is None:
    tmp = list(tmp_path.glob(".out.tmp-*/state*"))
    if tmp and any(tmp_path.glob(".out.tmp-*/state*/**/d/*")):
      break
    time.sleep(0.05)
  assert p.poll() is None, p.stderr.read()
  p.send_signal(sig)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 130, err
  why = "signal 15" if sig == signal.SIGTERM else "interrupted"
  assert_one_line_error(p.returncode, err, why, "nothing was written")
  assert_nothing_left(dst)
