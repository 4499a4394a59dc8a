"""Parameter counts of the 7B preset and the weights table against the release manifest."""

import collections

import numpy as np
import pytest

from bagel_jax.weights import table as weights
from bagel_jax.api import BagelModel
from bagel_jax.config import bagel_7b_mot, bagel_tiny, load_config
from tests.conftest import FIXTURE_DIR

MANIFEST = FIXTURE_DIR.parent / "ema_manifest.tsv"


def read_manifest():
  rows = {}
  for line in MANIFEST.read_text().splitlines():
    if not line.strip() or line.startswith("#"):
      continue
    key, shape, dtype = line.split("\t")[:3]
    rows[key] = (tuple(int(s) for s in shape.split("x")), dtype)
  return rows


@pytest.fixture(scope="module")
def model_7b():
  return BagelModel(bagel_7b_mot())


def test_7b_param_counts(model_7b):
  counts = model_7b.num_params()
  assert counts["bagel"] == 14_607_260_128
  assert counts["vae"] == 83_819_683


def _check_table(model, table, upstream_shapes):
  abstract = model.abstract_params()
  by_key = collections.Counter(r.upstream for r in table)
  assert all(c == 1 for c in by_key.values()), [k for k, c in by_key.items() if c > 1][:3]
  # Every element of every parameter is covered by exactly one rule.
  cover = {}
  for r in table:
    leaf = weights._get(abstract, r.path)
    sub = tuple(leaf.shape)[:len(r.index)]
    cov = cover.setdefault(r.path, np.zeros(sub or (1,), np.int32))
    cov[r.index if r.index else 0] += 1
    assert weights.expected_upstream_shape(r, abstract) == upstream_shapes[r.upstream], r.upstream
  for path in weights._paths(abstract):
    assert path in cover, f"parameter {path} has no upstream tensor"
    assert (cover[path] == 1).all(), f"parameter {path} covered {cover[path]} times"


def test_manifest_maps_one_to_one(model_7b):
  manifest = read_manifest()
  assert len(manifest) == 1223
  table = weights.rules(model_7b.cfg)
  ema = [r for r in table if r.file == "ema"]
  assert {r.upstream for r in ema} == set(manifest)
  assert all(dtype.upper() in ("BF16", "BFLOAT16", "TORCH.BFLOAT16") for _, dtype in manifest.values())
  vae_shapes = {r.upstream: weights.expected_upstream_shape(r, model_7b.abstract_params())
                for r in table if r.file == "ae"}
  _check_table(model_7b, table, {**{k: v[0] for k, v in manifest.items()}, **vae_shapes})


def test_fixture_config_and_table():
  cfg = load_config(FIXTURE_DIR)
  assert cfg == bagel_tiny()
  from safetensors import safe_open
  model = BagelModel(cfg)
  shapes = {}
  for fid, name in weights.FILE_NAMES.items():
    with safe_open(str(FIXTURE_DIR / name), framework="numpy") as f:
      for k in f.keys():
        shapes[k] = tuple(f.get_slice(k).get_shape())
  table = weights.rules(cfg)
  assert {r.upstream for r in table} == set(shapes)
  _check_table(model, table, shapes)
