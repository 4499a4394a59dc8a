"""Fault injection for the converters and the folders they write: nothing a user owns is ever deleted.

- `--overwrite` replaces only a folder the project wrote (its marker lists every file), a folder
  converted before markers existed, or an empty folder; anything else is refused in one line
  naming the folder and the foreign file, and is left exactly as it was;
- a conversion killed with SIGKILL at seeded random points leaves the old complete output or
  the new complete output, never a mix; the next run removes the dead run's temporary folder
  (and no one else's) and writes an output bit-identical to an uninterrupted run's;
- a full disk and a read-only destination give one line and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import time

import pytest

from bagel_jax.weights.folders import MARKER, check_removable, foreign_file, remove_stale_temps, write_marker
from bagel_jax.weights.errors import CheckpointError
from convert.orbax_to_safetensors import export
from convert.safetensors_to_orbax import convert, main as convert_main, main_wrapper
from tests.fault_tools import assert_one_line, full_disk, read_only, snapshot

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures" / "bagel_tiny_a"
REPO = pathlib.Path(__file__).resolve().parent.parent


def run_convert(capsys, *argv) -> tuple[int, str]:
  rc = main_wrapper(convert_main, [*map(str, argv), "--quiet"])
  return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, pathlib.Path]:
  """Uninterrupted conversions (bfloat16 as stored, and float32) and their exports, to compare with."""
  root = tmp_path_factory.mktemp("faults_convert")
  out = {}
  for dtype in ("bfloat16", "float32"):
    conv = root / f"conv_{dtype}"
    convert(FIXTURE_DIR, conv, dtype=None if dtype == "bfloat16" else dtype, progress=False)
    export(conv, root / f"export_{dtype}", progress=False)
    out[dtype] = root / f"export_{dtype}"
  return out


def exported_bytes(conv: pathlib.Path, tmp: pathlib.Path) -> dict[str, str]:
  back = tmp / f"export_{conv.name}_{time.monotonic_ns()}"
  export(conv, back, progress=False)
  got = {k: v for k, v in snapshot(back).items() if k.endswith(".safetensors")}
  shutil.rmtree(back)
  return got


def ref_bytes(ref: pathlib.Path) -> dict[str, str]:
  return {k: v for k, v in snapshot(ref).items() if k.endswith(".safetensors")}


# ----------------------------------------------------------------------------- ownership
def test_overwrite_refuses_a_folder_with_user_files(tmp_path, capsys):
  """The reported data loss: `--dst ~/thesis --overwrite` must not delete thesis.tex."""
  thesis = tmp_path / "thesis"
  thesis.mkdir()
  (thesis / "thesis.tex").write_text("\\chapter{Results}\n")
  (thesis / "figs").mkdir()
  (thesis / "figs" / "a.png").write_bytes(b"png")
  before = snapshot(thesis)
  rc, err = run_convert(capsys, "--src", FIXTURE_DIR, "--dst", thesis, "--overwrite")
  assert rc == 2
  line = assert_one_line(err, "error: ")
  assert str(thesis) in line and ("figs/a.png" in line or "thesis.tex" in line), line
  assert snapshot(thesis) == before
  assert not list(tmp_path.glob(".thesis.*"))


def test_overwrite_replaces_own_output_but_not_added_files(tmp_path, capsys):
  dst = tmp_path / "out"
  assert run_convert(capsys, "--src", FIXTURE_DIR, "--dst", dst)[0] == 0
  marker = json.loads((dst / MARKER).read_text())
  assert "conversion.json" in marker["files"] and any(f.startswith("state/") for f in marker["files"])
  assert run_convert(capsys, "--src", FIXTURE_DIR, "--dst", dst, "--overwrite", "--dtype", "float32")[0] == 0
  assert json.loads((dst / "conversion.json").read_text())["dtype"] == "float32"
  (dst / "state" / "my_notes.md").write_text("mine")  # a user's file inside the project's folder
  rc, err = run_convert(capsys, "--src", FIXTURE_DIR, "--dst", dst, "--overwrite")
  line = assert_one_line(err, "error: ")
  assert rc == 2 and str(dst) in line and "state/my_notes.md" in line, line
  assert (dst / "state" / "my_notes.md").read_text() == "mine"


def test_empty_and_legacy_folders_are_replaced_release_folders_are_not(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  assert run_convert(capsys, "--src", FIXTURE_DIR, "--dst", empty, "--overwrite")[0] == 0
  legacy = tmp_path / "legacy"  # converted before markers existed: recognised by conversion.json
  shutil.copytree(empty, legacy)
  (legacy / MARKER).unlink()
  assert foreign_file(legacy) is None
  assert run_convert(capsys, "--src", FIXTURE_DIR, "--dst", legacy, "--overwrite")[0] == 0
  release = tmp_path / "release"  # e.g. a downloaded release: never ours to delete
  shutil.copytree(FIXTURE_DIR, release)
  before = snapshot(release)
  with pytest.raises(CheckpointError, match=r"refusing to replace it: .* was not written by bagel_jax"):
    check_removable(release)
  rc, err = run_convert(capsys, "--src", FIXTURE_DIR, "--dst", release, "--overwrite")
  assert rc == 2 and str(release) in assert_one_line(err, "error: ")
  assert snapshot(release) == before


def test_stale_temporary_folders_of_dead_runs_only(tmp_path):
  dst = tmp_path / "out"
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  dead_pid = int(dead.stdout)
  stale = tmp_path / ".out.tmp-dead"
  stale.mkdir()
  (stale / "piece").write_bytes(b"x")
  write_marker(stale, "orbax")
  info = json.loads((stale / MARKER).read_text())
  (stale / MARKER).write_text(json.dumps(dict(info, pid=dead_pid)))
  live = tmp_path / ".out.tmp-live"  # a run still writing (this process)
  live.mkdir()
  write_marker(live, "orbax")
  users = tmp_path / ".out.tmp-users"  # same name pattern, but not ours
  users.mkdir()
  (users / "data.csv").write_text("1,2\n")
  empty = tmp_path / ".out.tmp-empty"
  empty.mkdir()
  removed = remove_stale_temps(dst)
  assert sorted(p.name for p in removed) == [".out.tmp-dead", ".out.tmp-empty"]
  assert live.is_dir() and (users / "data.csv").read_text() == "1,2\n"


# ----------------------------------------------------------------------------- kill -9
def _slow_convert_cmd(dst: pathlib.Path, *flags: str) -> list[str]:
  code = ("import sys, time; from convert.safetensors_to_orbax import main, main_wrapper; "
          "import convert.safetensors_to_orbax as c; orig = c.convert; "
          "c.convert = lambda *a, **k: orig(*a, **dict(k, on_piece=lambda n, b: time.sleep(0.01))); "
          f"sys.exit(main_wrapper(main, ['--src', {str(FIXTURE_DIR)!r}, '--dst', {str(dst)!r}, '--quiet', "
          f"{', '.join(repr(f) for f in flags)}]))")
  return [sys.executable, "-c", code]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_mid_overwrite_leaves_old_or_new_then_completes(tmp_path, capsys, reference, seed):
  """An existing float32 conversion is being replaced by a bfloat16 one when the converter is
  killed with SIGKILL at a seeded random moment: the destination is the complete old output or
  the complete new one; the same command then finishes, removes the dead run's temporary
  folder, and its output is bit-identical to an uninterrupted conversion's."""
  rng = random.Random(seed)
  dst = tmp_path / "out"
  assert run_convert(capsys, "--src", FIXTURE_DIR, "--dst", dst, "--dtype", "float32")[0] == 0
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  p = subprocess.Popen(_slow_convert_cmd(dst, "--overwrite"), cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not list(tmp_path.glob(".out.tmp-*")):
    assert p.poll() is None, p.stderr.read()
    assert time.time() < deadline
    time.sleep(0.01)
  time.sleep(rng.uniform(0.0, 2.5))
  p.kill()
  p.wait()
  stored = json.loads((dst / "conversion.json").read_text())["dtype"]
  assert stored in ("float32", "as stored (ema bfloat16, ae float32)")
  want = reference["float32" if stored == "float32" else "bfloat16"]
  assert exported_bytes(dst, tmp_path) == ref_bytes(want)  # complete, old or new
  assert run_convert(capsys, "--src", FIXTURE_DIR, "--dst", dst, "--overwrite")[0] == 0
  assert exported_bytes(dst, tmp_path) == ref_bytes(reference["bfloat16"])
  assert not list(tmp_path.glob(".out.*"))


# ----------------------------------------------------------------------------- full disk, read-only
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
  with full_disk(tmp_path / "disk", 400_000) as (disk, preexec, text):
    (disk / "mine.txt").write_text("keep me\n")
    dst = disk / "out"
    r = subprocess.run([sys.executable, "-m", "convert.safetensors_to_orbax", "--src", str(FIXTURE_DIR), "--dst",
                        str(dst), "--quiet"], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, preexec_fn=preexec, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    line = assert_one_line(r.stderr, "error: ")
    assert text in line, line
    assert sorted(p.name for p in disk.iterdir()) == ["mine.txt"]
    assert (disk / "mine.txt").read_text() == "keep me\n"


def test_read_only_destination_is_one_line(tmp_path):
  parent = tmp_path / "ro"
  parent.mkdir()
  (parent / "mine.txt").write_text("keep me\n")
  before = snapshot(parent)
  with read_only(parent) as env:
    r = subprocess.run([sys.executable, "-m", "convert.safetensors_to_orbax", "--src", str(FIXTURE_DIR), "--dst",
                        str(parent / "out"), "--quiet"], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", **env),
                       capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  line = assert_one_line(r.stderr, "error: ")
  assert str(parent) in line and ("Read-only file system" in line or "Permission denied" in line), line
  assert snapshot(parent) == before
