"""Training checkpoints under faults (a small state, no model): damaged steps are found by their
fingerprints and skipped, a non-finite state is never saved, rotation keeps a user's files."""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
import pytest

from bagel_jax.train.checkpoints import CheckpointCorrupt, Checkpointer, fingerprint, foreign_step_file
from tests.fault_tools import flip_bytes, snapshot, truncate


def state(step: int) -> dict:
  rng = np.random.default_rng(step)
  return {"params": {"w": rng.standard_normal((64, 33)).astype(np.float32),
                     "b": rng.standard_normal(7).astype(np.float32).astype("bfloat16")},
          "step": np.int32(step), "rng": np.arange(2, dtype=np.uint32) + step}


def abstract() -> dict:
  import jax
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state(0))


def saved(tmp_path: pathlib.Path, steps=(2, 4, 6), keep: int = 3) -> Checkpointer:
  ck = Checkpointer(tmp_path / "ck", keep=keep, save_every=2, async_save=False)
  for s in steps:
    assert ck.save(s, state(s), {"pos": s}, {"note": "test"})
  ck.close()
  return Checkpointer(tmp_path / "ck", keep=keep, save_every=2, async_save=False)


def _array_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in p.as_posix()),
             key=lambda p: p.stat().st_size)


def test_fingerprint_sees_one_flipped_bit():
  a = state(1)
  b = {**a, "params": {**a["params"], "w": a["params"]["w"].copy()}}
  b["params"]["w"].view(np.uint32)[5, 7] ^= 1 << 9
  fa, fb = fingerprint(a)[0], fingerprint(b)[0]
  assert fa["params/w"] != fb["params/w"] and fa["params/b"] == fb["params/b"]


@pytest.mark.parametrize("damage", ["flip_array_bytes", "truncate_array_file", "flip_metadata", "flip_data_json",
                                    "remove_meta"])
def test_damaged_newest_step_falls_back_to_the_one_before(tmp_path, caplog, damage):
  ck = saved(tmp_path)
  newest = tmp_path / "ck" / "6"
  {"flip_array_bytes": lambda: flip_bytes(_array_file(newest)),
   "truncate_array_file": lambda: truncate(_array_file(newest), 40),
   "flip_metadata": lambda: flip_bytes(newest / "state" / "_METADATA", 30),
   "flip_data_json": lambda: flip_bytes(newest / "data" / "metadata", 3, 1),
   "remove_meta": lambda: [p.unlink() for p in (newest / "meta").iterdir()]}[damage]()
  before = snapshot(newest)
  with caplog.at_level(logging.WARNING, logger="bagel_jax.train"):
    step, st, data, meta = ck.restore_latest(abstract())
  assert step == 4 and data == {"pos": 4} and meta["note"] == "test"
  np.testing.assert_array_equal(st["params"]["w"], state(4)["params"]["w"])
  warns = [r.getMessage() for r in caplog.records if "corrupt or incomplete" in r.getMessage()]
  assert len(warns) == 1 and str(newest) in warns[0] and "\n" not in warns[0]
  assert snapshot(tmp_path / "ck" / "6.corrupt-0") == before  # set aside, never deleted
  assert ck.latest_step() == 4
  ck.close()


def test_no_intact_step_is_one_error_naming_the_folder(tmp_path):
  ck = saved(tmp_path, steps=(2, 4))
  for s in (2, 4):
    flip_bytes(_array_file(tmp_path / "ck" / str(s)))
  with pytest.raises(CheckpointCorrupt) as e:
    ck.restore_latest(abstract())
  assert str(e.value).startswith(f"{tmp_path / 'ck'}: no intact checkpoint") and "\n" not in str(e.value)
  ck.close()


def test_non_finite_state_is_never_saved(tmp_path, caplog):
  ck = Checkpointer(tmp_path / "ck", keep=2, save_every=1, async_save=False)
  bad = state(3)
  bad["params"]["w"][0, 0] = np.nan
  with caplog.at_level(logging.ERROR, logger="bagel_jax.train"):
    assert not ck.save(3, bad, {"pos": 3})
  assert ck.latest_step() is None and "non-finite" in caplog.text
  ck.close()


def test_rotation_keeps_steps_holding_user_files(tmp_path, caplog):
  ck = Checkpointer(tmp_path / "ck", keep=2, save_every=2, async_save=False)
  for s in (2, 4):
    ck.save(s, state(s), {"pos": s})
  (tmp_path / "ck" / "2" / "my_eval.json").write_text(json.dumps({"acc": 1}))
  with caplog.at_level(logging.WARNING, logger="bagel_jax.train"):
    for s in (6, 8):
      ck.save(s, state(s), {"pos": s})
  ck.close()
  left = sorted(p.name for p in (tmp_path / "ck").iterdir())
  assert left == ["2", "6", "8"], left  # 4 rotated out; 2 kept for the user's file
  assert foreign_step_file(tmp_path / "ck" / "2") == "my_eval.json"
  assert "kept old checkpoint" in caplog.text and "my_eval.json" in caplog.text
