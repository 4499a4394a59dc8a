"""The grain pipeline from a config's `data` section to packed batches.

    groups -> per group: source[host shard].shuffle(seed).repeat().random_map(parse)
           -> IterDataset.mix(weights) -> [mp_prefetch(workers)] -> PackBatches(rows, capacity)

Group formats (`data.groups.NAME.format`):
- "t2i_parquet": upstream T2I parquet (`image` bytes, `captions` JSON dict of variants); `path`.
- "edit_parquet": upstream editing parquet (`image_list`, `instruction_list`); `path`.
- "vlm_jsonl": LLaVA-style jsonl (`image` path(s) under `image_dir`, or `video`: a clip or a frame
  folder under `image_dir`, with a `<video>` placeholder; `conversations`); `path`; video frame
  sampling `max_num_frames` (12), `min_num_frames` (8), `frame_sample` ("rand", "middle", "fpsX").
- "tfds": a TFDS dataset in ArrayRecord (`name`, `split`, `data_dir`) with `task` "t2i"
  (`image_key`, `caption_key`), "vlm" (`image_key`, `conversations_key`) or "qa" (`image_key`,
  `qa_key`: a JSON list of [question, answer]; one pair is drawn per sample). The shapes demo
  dataset ("bagel_shapes", "bagel_shapes/small") is rendered on first use.

Every random choice (caption variant, edit span, QA pair, CFG dropout) comes from grain's
per-element generator, so a pipeline restored from its state yields the same batches. Records
that fail to parse become `Skipped` and are counted by the packer.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import numpy as np

from bagel_jax import layout as L
from bagel_jax.config import BagelConfig
from bagel_jax.data import samples as S
from bagel_jax.data.packing import PackBatches, PackSpec
from bagel_jax.data.sources import UNREADABLE, DataError, GuardedSource, JsonlSource, ParquetSource, tfds_source
from bagel_jax.data.transforms import DEFAULT_MAX_PIXELS, ImageTransform
from bagel_jax.data.video import FrameSampler, PyAVMissing, frame_indices

FORMATS = ("t2i_parquet", "edit_parquet", "vlm_jsonl", "tfds")
TASKS = ("t2i", "vlm", "qa")


class ParseRecord:
  """record, rng -> Sample | Skipped (picklable, for grain worker processes)."""

  def __init__(self, fmt: str, group_cfg: dict, builders: S.Builders, group: int, name: str = ""):
    self.fmt, self.g, self.b, self.group = fmt, dict(group_cfg), builders, group
    self._load = S.image_file_loader(self.g.get("image_dir", "")) if fmt == "vlm_jsonl" else None
    self._video = None
    if fmt == "vlm_jsonl":
      self._video = S.video_file_loader(self.g.get("image_dir", ""), frame_sampler(name, self.g))

  def __call__(self, rec: Any, rng: np.random.Generator):
    try:
      return self.parse(rec, rng)
    except PyAVMissing:
      raise  # not a bad record: no video record could be read
    except Exception as e:  # noqa: BLE001 -- any bad record is skipped and counted, never fatal
      return S.Skipped(self.group, f"{type(e).__name__}: {e}")

  def parse(self, rec, rng):
    if isinstance(rec, dict) and UNREADABLE in rec:
      raise S.SampleError(f"unreadable record ({rec[UNREADABLE]})")
    g, b = self.g, self.b
    if self.fmt == "t2i_parquet":
      return S.t2i_sample(rec, b, rng, self.group)
    if self.fmt == "edit_parquet":
      return S.edit_sample(rec, b, rng, self.group)
    if self.fmt == "vlm_jsonl":
      return S.vlm_sample(rec, b, rng, self.group, load_image=self._load, load_video=self._video)
    task = g.get("task", "t2i")
    image_key = g.get("image_key", "image")
    if task == "t2i":
      return S.t2i_sample(rec, b, rng, self.group, image_key=image_key, caption_key=g.get("caption_key", "caption"))
    if task == "vlm":
      r = {"image": rec.get(image_key), "conversations": rec[g.get("conversations_key", "conversations")]}
      return S.vlm_sample(r, b, rng, self.group)
    if task == "qa":
      pairs = json.loads(S._text(rec[g.get("qa_key", "qa")]))
      if not pairs:
        raise S.SampleError("no question/answer pair")
      if g.get("qa_turns", "one") == "all":  # every pair, in random order, as one multi-turn conversation
        pairs = [pairs[i] for i in rng.permutation(len(pairs))]
      else:
        pairs = [pairs[int(rng.integers(len(pairs)))]]
      conv = []
      for i, (q, a) in enumerate(pairs):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
      return S.vlm_sample({"image": rec[image_key], "conversations": conv}, b, rng, self.group)
    raise S.SampleError(f"unknown task {task!r}")


def frame_sampler(name: str, g: dict) -> FrameSampler:
  """A group's video frame sampler: `max_num_frames` (12), `min_num_frames` (8), `frame_sample` ("rand")."""
  try:
    fs = FrameSampler(int(g.get("max_num_frames", 12)), int(g.get("min_num_frames", 8)),
                      str(g.get("frame_sample", "rand")))
    frame_indices(fs.min_num_frames, 1, fs.sample, np.random.default_rng(0))  # refuses an unknown sampling now
  except (ValueError, TypeError) as e:
    raise DataError(f"data group {name!r}: {e}") from None
  return fs


def make_source(name: str, g: dict, build_tfds: bool = True):
  fmt = g.get("format", "")
  if fmt not in FORMATS:
    raise DataError(f"data group {name!r}: format {fmt!r} is not one of {FORMATS}")
  try:
    if fmt == "t2i_parquet":
      src = ParquetSource(g.get("path", ""), ["image", "captions"])
    elif fmt == "edit_parquet":
      src = ParquetSource(g.get("path", ""), ["image_list", "instruction_list"])
    elif fmt == "vlm_jsonl":
      src = JsonlSource(g.get("path", ""))
    else:
      if g.get("task", "t2i") not in TASKS:
        raise DataError(f"task {g.get('task')!r} is not one of {TASKS}")
      src = tfds_source(g.get("name", ""), g.get("split", "train"), g.get("data_dir") or None, build=build_tfds)
  except DataError as e:
    raise DataError(f"data group {name!r}: {e}") from None
  if len(src) == 0:
    raise DataError(f"data group {name!r}: the dataset is empty ({g.get('path') or g.get('name')})")
  return GuardedSource(src)


def transforms_for(data_cfg, g: dict, model_cfg: BagelConfig) -> tuple[ImageTransform, ImageTransform]:
  get = lambda k: g.get(k) or data_cfg.get(k)
  vae = ImageTransform(int(get("vae_max_size")), int(get("vae_min_size")), model_cfg.latent_downsample)
  vit = ImageTransform(int(get("vit_max_size")), int(get("vit_min_size")), model_cfg.vit.patch_size,
                       int(get("vit_max_pixels") or DEFAULT_MAX_PIXELS))
  return vae, vit


def image_limits(data_cfg, model_cfg: BagelConfig) -> tuple[int, int]:
  """Largest VAE and ViT image sides any group can produce (pixels)."""
  vae_side = vit_side = 0
  for g in data_cfg.groups.values():
    vae, vit = transforms_for(data_cfg, dict(g), model_cfg)
    vae_side, vit_side = max(vae_side, vae.max_side), max(vit_side, vit.max_side)
  return vae_side, vit_side


def check_image_limits(data_cfg, model_cfg: BagelConfig) -> None:
  """Refuses image sizes beyond the model's position tables (before anything is built).

  With interpolate_pos every size maps into the tables (upstream's interpolated ids): nothing to refuse.
  """
  if model_cfg.interpolate_pos:
    return
  for name, g in data_cfg.groups.items():
    vae, vit = transforms_for(data_cfg, dict(g), model_cfg)
    lat = vae.max_side // model_cfg.latent_downsample
    if lat > model_cfg.max_latent_size:
      raise DataError(f"data group {name!r}: VAE images up to {vae.max_side} px give {lat} latent tokens per side, "
                      f"beyond the latent position table (max_latent_size={model_cfg.max_latent_size}, i.e. "
                      f"{model_cfg.max_image_side_gen} px); lower vae_max_size")
    vp = vit.max_side // model_cfg.vit.patch_size
    if vp > model_cfg.vit_max_num_patch_per_side:
      raise DataError(f"data group {name!r}: ViT images up to {vit.max_side} px give {vp} patches per side, "
                      f"beyond the ViT position table (vit_max_num_patch_per_side={model_cfg.vit_max_num_patch_per_side}, "
                      f"i.e. {model_cfg.max_image_side_vit} px); lower vit_max_size")


def capacity(data_cfg) -> L.Capacity:
  c = data_cfg.capacity
  t = int(c.tokens)
  pick = lambda k: int(c.get(k) or 0) or t
  return L.Capacity(tokens=t, und=pick("und"), gen=pick("gen"), vit=pick("vit"), vae=pick("vae"),
                    ce=pick("ce"), vae_images=int(c.get("vae_images") or 0) or max(1, t // 8))


def pack_spec(data_cfg, model_cfg: BagelConfig, rows: int) -> PackSpec:
  vae_side, _ = image_limits(data_cfg, model_cfg)
  cap = capacity(data_cfg)
  return PackSpec(rows=rows, capacity=cap, expected_tokens=int(data_cfg.get("expected_tokens") or cap.tokens),
                  vae_side=vae_side, vit_patch=model_cfg.vit.patch_size, vit_channels=model_cfg.vit.num_channels,
                  latent_downsample=model_cfg.latent_downsample, tokens=model_cfg.tokens,
                  max_patches_per_side=model_cfg.vit_max_num_patch_per_side,
                  max_latent_size=model_cfg.max_latent_size, interpolate_pos=model_cfg.interpolate_pos,
                  reweight_ce=bool(data_cfg.get("ce_reweighting", False)),
                  max_sample_tokens=int(data_cfg.get("max_tokens_per_sample", 0) or 0))


def make_pipeline(data_cfg, model_cfg: BagelConfig, tokenizer, *, seed: int, process_index: int = 0,
                  process_count: int = 1, build_tfds: bool = True) -> PackBatches:
  """The packed-batch IterDataset of this host (rows = data.rows / process_count)."""
  if not data_cfg.groups:
    raise DataError("no data groups (config.data.groups is empty)")
  rows = int(data_cfg.rows)
  if rows % process_count:
    raise DataError(f"data.rows={rows} is not divisible by {process_count} processes")
  check_image_limits(data_cfg, model_cfg)
  iters, weights = [], []
  for gi, (name, g) in enumerate(sorted(data_cfg.groups.items())):
    g = dict(g)
    w = float(g.get("weight", 1.0))
    if w <= 0:
      continue
    src = make_source(name, g, build_tfds)
    vae_t, vit_t = transforms_for(data_cfg, g, model_cfg)
    builders = S.Builders(tokenizer, vae_t, vit_t, model_cfg.vit.patch_size, model_cfg.latent_downsample,
                          float(data_cfg.text_cond_dropout), float(data_cfg.vit_cond_dropout),
                          float(data_cfg.vae_cond_dropout))
    ds = grain.MapDataset.source(src)
    if process_count > 1:
      ds = ds[process_index::process_count]
      if len(ds) == 0:
        raise DataError(f"data group {name!r}: no records for process {process_index} of {process_count}")
    ds = ds.seed(seed * 1000 + gi).shuffle().repeat(None)
    ds = ds.random_map(ParseRecord(g["format"], g, builders, gi, name))
    iters.append(ds.to_iter_dataset(grain.ReadOptions(num_threads=int(data_cfg.get("read_threads", 1)) or 1,
                                                      prefetch_buffer_size=int(data_cfg.get("read_buffer", 8)))))
    weights.append(w)
  if not iters:
    raise DataError("every data group has weight 0")
  mixed = iters[0] if len(iters) == 1 else grain.IterDataset.mix(iters, weights)
  workers = int(data_cfg.get("workers", 0))
  if workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads its absl flags in mp_prefetch (notebooks, tests)
      flags.FLAGS.mark_as_parsed()
    mixed = mixed.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return PackBatches(mixed, pack_spec(data_cfg, model_cfg, rows // process_count))


def group_names(data_cfg) -> list[str]:
  """Group names by group id (the `group` of a Sample and the keys of `samples_per_group`)."""
  return [n for n, _ in sorted(data_cfg.groups.items())]
