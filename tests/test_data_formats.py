"""The data pipeline on small files made here: upstream's T2I parquet, editing parquet, LLaVA jsonl,
and the shapes TFDS dataset; resize rules, CFG dropout, packing, mixing, sharding, corrupt rows,
and exact iterator resume."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bagel_jax import layout as L
from bagel_jax.config import bagel_tiny
from bagel_jax.data import pipeline, shapes
from bagel_jax.data import samples as S
from bagel_jax.data.packing import needs
from bagel_jax.data.sources import DataError, JsonlSource, ParquetSource
from bagel_jax.data.transforms import ImageTransform, resize_shape
from bagel_jax.train import base_config

CFG = bagel_tiny()  # VAE: 8 px per latent token, max 8 per side; ViT: patch 14, max 8 per side
TOK = shapes.tokenizer()


def png(w: int, h: int, colour=(200, 30, 30)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (w, h), colour).save(buf, format="PNG")
  return buf.getvalue()


def data_config(groups: dict, **kw):
  c = base_config().data
  c.groups = groups
  c.rows = 2
  c.capacity = dict(tokens=96, und=96, gen=48, vit=32, vae=48, ce=32, vae_images=4)
  c.expected_tokens = 96
  c.vae_max_size, c.vae_min_size, c.vit_max_size, c.vit_min_size = 32, 16, 28, 14
  c.text_cond_dropout = c.vit_cond_dropout = c.vae_cond_dropout = 0.0
  for k, v in kw.items():
    c[k] = v
  return c


def make_pipeline(dc, **kw):
  return pipeline.make_pipeline(dc, CFG, TOK, seed=0, **kw)


@pytest.fixture
def t2i_dir(tmp_path):
  d = tmp_path / "t2i"
  d.mkdir()
  rows = [{"image": png(40 + 8 * i, 24), "captions": json.dumps({"short": "a red square", "long": "two red squares"})}
          for i in range(6)]
  rows[2]["image"] = b"not an image"  # corrupt: skipped and counted
  rows[4]["captions"] = "{bad json"  # a plain string caption, still used
  pq.write_table(pa.Table.from_pylist(rows[:3]), d / "part-0.parquet", row_group_size=2)
  pq.write_table(pa.Table.from_pylist(rows[3:]), d / "part-1.parquet")
  return d


@pytest.fixture
def edit_file(tmp_path):
  rows = [{"image_list": [png(32, 32, (i * 40, 0, 0)) for i in range(3)],
           "instruction_list": [["a red square", "red"], ["a blue square"]]} for _ in range(4)]
  rows.append({"image_list": [png(32, 32)], "instruction_list": [["x"]]})  # one image: skipped
  path = tmp_path / "edit.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


@pytest.fixture
def llava(tmp_path):
  img_dir = tmp_path / "images"
  img_dir.mkdir()
  (img_dir / "a.png").write_bytes(png(30, 60))
  (img_dir / "b.png").write_bytes(png(28, 28))
  lines = [
      {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour are the shapes"},
                                           {"from": "gpt", "value": "red"}]},
      {"image": ["a.png", "b.png"], "conversations": [
          {"from": "human", "value": "<image> <image> how many shapes are there"},
          {"from": "gpt", "value": "two"}, {"from": "human", "value": "what shape are they"},
          {"from": "gpt", "value": "square"}]},
      {"image": "missing.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
  ]
  path = tmp_path / "llava.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  return path, img_dir


def test_resize_rules():
  # Upstream's MaxLongEdgeMinShortEdgeResize, worked by hand.
  assert resize_shape(1000, 500, 980, 224, 14) == (980, 490)
  assert resize_shape(100, 50, 980, 224, 14) == (448, 224)  # raised to the min short side
  assert resize_shape(4000, 100, 1024, 512, 16) == (1024, 32)  # the long-side cap wins over the min
  # Upstream rescales the *sides* by the pixel ratio (not its square root) when over max_pixels:
  # 980x980 > 2,007,040/4 px -> scale 0.5225 -> 512 -> 518 (37 x 14).
  assert resize_shape(2000, 2000, 980, 378, 14, max_pixels=2_007_040, img_num=4) == (518, 518)
  assert resize_shape(21, 21, 1024, 16, 16) == (16, 16)  # rounds to the nearest stride multiple
  x = ImageTransform(32, 16, 8)(Image.new("RGB", (64, 24), (255, 0, 0)))
  # 64x24: scale 2/3 (min side) -> 40x16; long side 40 > 32 -> x0.8 -> 32x13 -> 32x16
  assert x.shape == (16, 32, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x[5, 5], [1.0, -1.0, -1.0], atol=1e-6)


def test_t2i_parquet(t2i_dir):
  src = ParquetSource(t2i_dir, ["image", "captions"])
  assert len(src) == 6 and src[3]["captions"].startswith("{")
  dc = data_config({"t2i": dict(format="t2i_parquet", path=str(t2i_dir))})
  it = iter(make_pipeline(dc))
  arrays, info = next(it)
  lay = arrays["layout"]
  assert lay.token_kind.shape == (2, 96) and arrays["vae_images"].shape == (2, 4, 32, 32, 3)
  # Every sample: caption (no loss) + a noisy VAE image (loss). The (40..80) x 24 images become 32 px
  # wide (the long-side cap) and 16 px high, or 8 px for the widest (72 x 24 -> 32 x 11 -> 32 x 8).
  assert int(np.sum(lay.vae_image_noisy)) == info["samples"]
  grids = lay.vae_image_grid[lay.vae_image_noisy > 0]
  assert np.all(grids[:, 1] == 4) and set(grids[:, 0].tolist()) <= {1, 2}
  for _ in range(3):
    arrays, info = next(it)
  assert info["skipped"] >= 1 and any("UnidentifiedImageError" in k for k in info["skip_reasons"])


def test_edit_parquet(edit_file):
  dc = data_config({"edit": dict(format="edit_parquet", path=str(edit_file))})
  b = S.Builders(TOK, ImageTransform(32, 16, 8), ImageTransform(28, 14, 14), 14, 8)
  src = ParquetSource(edit_file, ["image_list", "instruction_list"])
  plans = set()
  for seed in range(30):
    s = S.edit_sample(src[0], b, np.random.default_rng(seed))
    kinds = tuple((type(i).__name__, getattr(i, "loss", None)) for i in s.plan)
    plans.add(kinds)
    # start image: clean VAE + ViT; the last item is always a noisy target
    assert kinds[:2] == (("VaeImage", False), ("VitImage", None)) and kinds[-1] == ("VaeImage", True)
    assert len(s.vae) == sum(k[0] == "VaeImage" for k in kinds) and len(s.vit) == sum(k[0] == "VitImage" for k in kinds)
  # both branches of upstream's parse_row occur: one step, and two steps with the intermediate re-added clean
  assert any(len(p) == 4 for p in plans) and any(len(p) == 8 for p in plans)
  with pytest.raises(S.SampleError, match="needs at least 2"):
    S.edit_sample(src[4], b, np.random.default_rng(0))
  arrays, info = next(iter(make_pipeline(dc)))
  assert info["samples"] >= 2 and arrays["vit_patches"].shape == (2, 32, 14 * 14 * 3)


def test_llava_jsonl(llava):
  path, img_dir = llava
  assert len(JsonlSource(path)) == 3
  b = S.Builders(TOK, None, ImageTransform(28, 14, 14), 14, 8)
  rec = json.loads(path.read_text().splitlines()[1])
  s = S.vlm_sample(rec, b, np.random.default_rng(0), load_image=S.image_file_loader(str(img_dir)))
  kinds = [(type(i).__name__, getattr(i, "loss", None)) for i in s.plan]
  assert kinds == [("VitImage", None), ("VitImage", None), ("Text", False), ("Text", True), ("Text", False),
                   ("Text", True)]
  assert s.plan[3].ids == TOK.encode("two") and len(s.vit) == 2
  dc = data_config({"vlm": dict(format="vlm_jsonl", path=str(path), image_dir=str(img_dir))})
  it = iter(make_pipeline(dc))
  for _ in range(2):
    arrays, info = next(it)
  assert info["skipped"] >= 1 and any("FileNotFoundError" in k for k in info["skip_reasons"])
  lay = arrays["layout"]
  # CE targets: each sample's labels are exactly its answers, each closed by <|im_end|>
  eos = CFG.tokens.eos_token_id
  answers = {tuple(TOK.encode("red") + [eos]), tuple(TOK.encode("two") + [eos] + TOK.encode("square") + [eos])}
  valid = np.asarray(lay.ce_weights) > 0
  assert valid.any()
  for b in range(valid.shape[0]):
    owner = np.asarray(lay.sample_ids)[b][np.asarray(lay.ce_indexes)[b][valid[b]]]
    labels = np.asarray(lay.ce_labels)[b][valid[b]]
    for sample in np.unique(owner):
      assert tuple(labels[owner == sample].tolist()) in answers, labels[owner == sample]


def test_cfg_dropout_drops_payloads():
  b = S.Builders(TOK, ImageTransform(32, 32, 8), ImageTransform(28, 28, 14), 14, 8, 1.0, 1.0, 1.0)
  sb = S.SampleBuilder(b)
  img = Image.new("RGB", (32, 32))
  sb.image(img, need_loss=False, need_vae=True, need_vit=True)
  sb.text("a red square", loss=False, enable_cfg=True)
  sb.image(img, need_loss=True, need_vae=False, need_vit=False)
  s = sb.build(np.random.default_rng(0))
  assert [type(i).__name__ for i in s.plan] == ["RopeSkip", "RopeSkip", "VaeImage"]
  assert len(s.vae) == 1 and not s.vit


def test_shapes_tfds_mix_and_resume(tmp_path):
  groups = {"t2i": dict(format="tfds", name="bagel_shapes/small", split="train", data_dir=str(tmp_path),
                        task="t2i", caption_key="caption", weight=3.0),
            "qa": dict(format="tfds", name="bagel_shapes/small", split="train", data_dir=str(tmp_path),
                       task="qa", qa_key="qa", weight=1.0)}
  dc = data_config(groups, rows=2)
  ds = make_pipeline(dc)
  it = iter(ds)
  batches = [next(it) for _ in range(12)]
  counts = batches[-1][1]["samples_per_group"]
  names = pipeline.group_names(dc)
  frac_t2i = counts[str(names.index("t2i"))] / sum(counts.values())
  assert 0.6 < frac_t2i < 0.9  # weights 3:1
  # Exact resume from a mid-stream state, including a pending sample.
  it2 = iter(ds)
  for _ in range(5):
    next(it2)
  state = json.loads(json.dumps(it2.get_state()))  # JSON round trip, as in the checkpoint
  it3 = iter(make_pipeline(dc))
  it3.set_state(state)
  for k in range(5, 12):
    a, _ = next(it3)
    ref = batches[k][0]
    np.testing.assert_array_equal(a["layout"].token_kind, ref["layout"].token_kind)
    np.testing.assert_array_equal(a["layout"].text_ids, ref["layout"].text_ids)
    np.testing.assert_array_equal(a["vae_images"], ref["vae_images"])
    np.testing.assert_array_equal(a["vit_patches"], ref["vit_patches"])



# ----------------------------------------------------------------------------- the per-host split
def colour(r: int) -> tuple[int, int, int]:
  """A solid colour that names record r (an image's colour survives any resize)."""
  return (10 + 20 * r, 250 - 20 * r, (53 * r) % 256)


def _solid_key(pixels: np.ndarray):
  x = np.round((np.asarray(pixels, np.float64).reshape(-1, 3) + 1) * 127.5).astype(int)
  assert (x == x[0]).all(), "not a solid image"
  return tuple(x[0].tolist())


def vae_keys(arrays, key=_solid_key) -> list:
  """A key per VAE image of the batch (its pixels, cropped to its latent grid)."""
  grids, px = np.asarray(arrays["layout"].vae_image_grid), CFG.latent_downsample
  return [key(arrays["vae_images"][b, i, :grids[b, i, 0] * px, :grids[b, i, 1] * px])
          for b, i in np.argwhere(grids[..., 0] > 0)]


def vit_keys(arrays) -> list:
  """A key per ViT patch of the batch (padding patches are exactly zero; no solid colour is)."""
  patches = np.asarray(arrays["vit_patches"]).reshape(-1, CFG.vit.patch_dim)
  return [_solid_key(p) for p in patches if np.any(p != 0)]


def stream_records(dc, keys, record_of, n_samples: int, **host) -> set:
  """The records one host's packed stream holds in its first `n_samples` samples (and a few more)."""
  it, seen, n = iter(make_pipeline(dc, **host)), set(), 0
  while n < n_samples:
    arrays, info = next(it)
    assert info["skipped"] == 0, info["skip_reasons"]
    assert arrays["layout"].token_kind.shape[0] == dc.rows // host.get("process_count", 1)
    seen |= {record_of[k] for k in keys(arrays)}
    n += info["samples"]
  return seen


def _split_formats(tmp_path):
  """(group config, keys of a batch, key -> record, record count) per data format."""
  n = 11
  t2i = tmp_path / "t2i"
  t2i.mkdir()
  rows = [{"image": png(24 + 8 * (r % 3), 16, colour(r)), "captions": json.dumps({"a": "a red square"})}
          for r in range(n)]
  pq.write_table(pa.Table.from_pylist(rows[:4]), t2i / "part-0.parquet", row_group_size=3)
  pq.write_table(pa.Table.from_pylist(rows[4:]), t2i / "part-1.parquet", row_group_size=5)
  edit = tmp_path / "edit.parquet"
  pq.write_table(pa.Table.from_pylist([{"image_list": [png(16, 16, colour(r))] * 2, "instruction_list": [["red"]]}
                                       for r in range(n)]), edit)
  images = tmp_path / "images"
  images.mkdir()
  lines = []
  for r in range(n):
    (images / f"{r}.png").write_bytes(png(28, 28, colour(r)))
    lines.append({"image": f"{r}.png", "conversations": [{"from": "human", "value": "<image> what colour"},
                                                         {"from": "gpt", "value": "red"}]})
  (tmp_path / "vlm.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  solid = {colour(r): r for r in range(n)}
  yield dict(format="t2i_parquet", path=str(t2i)), vae_keys, solid, n
  yield dict(format="edit_parquet", path=str(edit)), vae_keys, solid, n
  yield dict(format="vlm_jsonl", path=str(tmp_path / "vlm.jsonl"), image_dir=str(images)), vit_keys, solid, n
  # TFDS (the shapes dataset, text-to-image): a record is named by its whole transformed image
  g = dict(format="tfds", name="bagel_shapes/small", split="train", data_dir=str(tmp_path / "tfds"), task="t2i",
           caption_key="caption")
  src = pipeline.make_source("tfds", g)
  vae_t, _ = pipeline.transforms_for(data_config({}), g, CFG)
  exact = lambda x: np.round((np.asarray(x, np.float64) + 1) * 127.5).astype(np.uint8).tobytes() + bytes(np.shape(x)[:2])
  by_image = {exact(vae_t(S.decode_image(bytes(src[r]["image"])))): r for r in range(len(src))}
  assert len(by_image) == len(src) == 256  # every image distinct, so an image names its record
  yield g, lambda a: vae_keys(a, exact), by_image, len(src)


def test_hosts_split_every_format_into_disjoint_parts_of_the_whole(tmp_path):
  """Two hosts' streams hold disjoint records, together every record of the dataset, as the
  single-host stream does, for each data format (records named by their images)."""
  for g, keys, record_of, n in _split_formats(tmp_path):
    dc = data_config({"g": g}, rows=2)
    whole = stream_records(dc, keys, record_of, n + 8)
    hosts = [stream_records(dc, keys, record_of, (n + 1) // 2 + 8, process_index=i, process_count=2) for i in (0, 1)]
    assert whole == set(range(n)), (g["format"], sorted(set(range(n)) - whole))
    assert not hosts[0] & hosts[1], (g["format"], sorted(hosts[0] & hosts[1]))
    assert hosts[0] | hosts[1] == whole, g["format"]
    assert {len(h) for h in hosts} == {n // 2, (n + 1) // 2}, g["format"]


def test_packing_respects_capacities():
  plan = [L.Text([1, 2, 3], loss=True), L.VaeImage((2, 3), loss=True)]
  n = needs(plan)
  lay = L.pack([[plan]], L.Capacity(tokens=64), CFG.tokens, max_patches_per_side=8, max_latent_size=8)
  assert n[0] == int(np.sum(np.asarray(lay.token_kind) > 0))  # tokens
  assert n[2] == n[4] == 6 and n[5] == 4 and n[6] == 1  # gen, vae, ce, vae_images


def test_missing_and_empty_sources(tmp_path):
  with pytest.raises(DataError, match="dataset path does not exist"):
    ParquetSource(tmp_path / "nope", ["image"])
  (tmp_path / "x.txt").write_text("")
  with pytest.raises(DataError, match="holds no .parquet file"):
    ParquetSource(tmp_path, ["image"])
  (tmp_path / "e.jsonl").write_text("\n")
  with pytest.raises(DataError, match="is empty"):
    pipeline.make_source("g", dict(format="vlm_jsonl", path=str(tmp_path / "e.jsonl")))


def test_worker_processes_prefetch_and_resume(tmp_path):
  """data.workers > 0: grain worker processes parse the records; batches are valid and a restored
  iterator continues exactly as the uninterrupted one."""
  groups = {"t2i": dict(format="tfds", name="bagel_shapes/small", split="train", data_dir=str(tmp_path),
                        task="t2i", caption_key="caption", weight=1.0),
            "qa": dict(format="tfds", name="bagel_shapes/small", split="train", data_dir=str(tmp_path),
                       task="qa", qa_key="qa", weight=1.0)}
  dc = data_config(groups, rows=2, workers=2)
  it = iter(make_pipeline(dc))
  batches = [next(it)[0] for _ in range(6)]
  # every batch holds text and images, and over the six both groups' samples (ViT: QA, VAE: T2I)
  kinds = np.stack([b["layout"].token_kind for b in batches])
  assert all((k == L.TOKEN_TEXT).any() and ((k == L.TOKEN_VIT) | (k == L.TOKEN_VAE)).any() for k in kinds)
  assert (kinds == L.TOKEN_VIT).any() and (kinds == L.TOKEN_VAE).any()  # both groups' samples
  it2 = iter(make_pipeline(dc))
  for _ in range(3):
    next(it2)
  state = json.loads(json.dumps(it2.get_state()))
  it3 = iter(make_pipeline(dc))
  it3.set_state(state)
  for k in range(3, 6):
    a, _ = next(it3)
    np.testing.assert_array_equal(a["layout"].text_ids, batches[k]["layout"].text_ids)
    np.testing.assert_array_equal(a["vae_images"], batches[k]["vae_images"])
