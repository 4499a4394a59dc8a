"""Sequence plans -> one packed sequence and its `Layout` (upstream `PackedDataset.pack_sequence`).

A sample is a list of plan items (`Text`, `VitImage`, `VaeImage`).  `pack` lays out one or
more samples per row into a fixed token budget and returns a `Layout`: per-token int32
arrays (token kind, expert, rope id, sample id, text ids, the four attention intervals),
per-expert token indexes padded to a static capacity, and the ViT / VAE / CE index sets.
Index arrays are padded with the row length T (out of range: gathers fill zeros,
scatters drop); padded tokens see nothing and are seen by nobody.

Upstream rules reproduced here:
- text: `<|im_start|>` + ids + `<|im_end|>`, causal, one rope id per token; CE labels on
  `<|im_start|>` and the ids (next token), on `<|im_end|>` only with `special_token_loss`.
- ViT image: `<|vision_start|>` + patches + `<|vision_end|>`, full, all at one rope id, then +1.
- VAE image: markers + h*w latents at one rope id; noisy (loss) blocks are "noise" and do not
  advance the rope id, so the clean copy after them shares it; clean blocks are "full", +1.
- video frames (VAE images with split_start / split_end / frame_delta): one split for the clip,
  "noise" only for a target without frame_delta (else "full"), each frame at the current rope id,
  which then advances by frame_delta (else as a VAE image); the frames of a target clip share one
  timestep (`vae_image_timestep`: upstream draws it at the split's first frame).
- markers and ViT tokens use the und expert, VAE latent tokens the gen expert.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence, Union

import flax.struct
import jax
import numpy as np

from bagel_jax.config import BagelConfig, SpecialTokens
from bagel_jax.image import navit_position_ids

TOKEN_PAD, TOKEN_TEXT, TOKEN_VIT, TOKEN_VAE = 0, 1, 2, 3
EXPERT_UND, EXPERT_GEN = 0, 1
MODE_CAUSAL, MODE_FULL, MODE_NOISE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Text:
  ids: Sequence[int]
  loss: bool = False
  special_token_loss: bool = False
  special_token_label: int | None = None
  enable_cfg: bool = False


@dataclasses.dataclass(frozen=True)
class VitImage:
  grid: tuple[int, int]  # (rows, cols) of ViT patches
  special_token_loss: bool = False
  special_token_label: int | None = None
  enable_cfg: bool = False


@dataclasses.dataclass(frozen=True)
class VaeImage:
  grid: tuple[int, int]  # (rows, cols) of latent tokens
  loss: bool = False  # a generation target: noisy, with MSE
  special_token_loss: bool = False
  special_token_label: int | None = None
  enable_cfg: bool = False
  # Video frames (upstream's `_add_video`): the frames of one clip share one split, from the frame
  # with split_start to the one with split_end; frame_delta (the gap to the next sampled frame)
  # advances the rope id instead of the usual rule, and makes a target clip's split "full".
  split_start: bool = True
  split_end: bool = True
  frame_delta: int | None = None


@dataclasses.dataclass(frozen=True)
class RopeSkip:
  """What a CFG-dropped image leaves behind: the rope id still advances by one."""


Item = Union[Text, VitImage, VaeImage, RopeSkip]
Plan = Sequence[Item]


def cfg_dropout(plan: Plan, rng: np.random.Generator, text_p: float, vit_p: float, vae_p: float
                ) -> tuple[list[Item], list[bool]]:
  """Upstream's pack-time CFG dropout: items with enable_cfg are dropped with these probabilities.

  Returns the new plan and, per original item, whether it was kept (to drop its payload).
  Dropped text vanishes; a dropped image becomes `RopeSkip`.
  """
  out, kept = [], []
  for item in plan:
    p = {Text: text_p, VitImage: vit_p, VaeImage: vae_p}.get(type(item), 0.0)
    drop = bool(getattr(item, "enable_cfg", False)) and rng.random() < p
    kept.append(not drop)
    if not drop:
      out.append(item)
    elif not isinstance(item, Text):
      out.append(RopeSkip())
  return out, kept


def item_num_tokens(item: Item) -> int:
  if isinstance(item, Text):
    return len(item.ids) + 2
  if isinstance(item, (VitImage, VaeImage)):
    return item.grid[0] * item.grid[1] + 2
  return 0


def plan_num_tokens(plan: Plan) -> int:
  return sum(item_num_tokens(i) for i in plan)


@dataclasses.dataclass(frozen=True)
class Capacity:
  """Static sizes of one packed row (all index sets padded to these)."""

  tokens: int
  und: int | None = None  # None: exactly what the rows need (shapes then vary with the data)
  gen: int | None = None
  vit: int | None = None
  vae: int | None = None
  ce: int | None = None
  vae_images: int | None = None


@flax.struct.dataclass
class Layout:
  """Per-row arrays; every field has a leading batch axis B."""

  token_kind: jax.Array  # [B, T]
  expert: jax.Array  # [B, T]
  rope_ids: jax.Array  # [B, T]
  sample_ids: jax.Array  # [B, T] (-1 for padding)
  text_ids: jax.Array  # [B, T] token id at text positions, 0 elsewhere
  k_start: jax.Array  # [B, T]
  k_end: jax.Array
  q_start: jax.Array
  q_end: jax.Array
  und_indexes: jax.Array  # [B, Cu]
  gen_indexes: jax.Array  # [B, Cg]
  vit_indexes: jax.Array  # [B, Nv] positions of ViT tokens
  vit_position_ids: jax.Array  # [B, Nv] `image.navit_position_ids` (row * max_patches_per_side + col unless interpolated)
  vit_block_start: jax.Array  # [B, Nv] in the ViT token stream
  vit_block_end: jax.Array
  vae_indexes: jax.Array  # [B, Nl] positions of latent tokens
  latent_position_ids: jax.Array  # [B, Nl] the same over max_latent_size
  vae_image_ids: jax.Array  # [B, Nl] which VAE image of the row (-1 padding)
  vae_noisy: jax.Array  # [B, Nl] 1 for a generation target
  ce_indexes: jax.Array  # [B, Nc]
  ce_labels: jax.Array  # [B, Nc]
  ce_weights: jax.Array  # [B, Nc] float32: 0 padding, else 1 or upstream's len2weight
  vae_image_noisy: jax.Array  # [B, Ni] 1 where VAE image i of the row is a target
  vae_image_grid: jax.Array  # [B, Ni, 2] (rows, cols) in latent tokens
  vae_image_timestep: jax.Array  # [B, Ni] the image whose timestep image i uses (itself; a clip's first frame)

  @property
  def length(self) -> int:
    return self.token_kind.shape[1]


def len2weight(n: int) -> float:
  """Upstream's "square" CE reweighting: 1/sqrt(segment length)."""
  return 1.0 / math.sqrt(n)


class LayoutError(ValueError):
  pass


def _grid_ids(grid: tuple[int, int], side: int, interpolate: bool, what: str, field: str) -> list[int]:
  """An image's position ids (`image.navit_position_ids`); a grid beyond the table is a LayoutError."""
  try:
    return navit_position_ids(grid[0], grid[1], side, interpolate).tolist()
  except ValueError:
    raise LayoutError(f"{what} grid {grid[0]}x{grid[1]} exceeds {field}={side}") from None


def _pack_row(samples: Sequence[Plan], tokens: SpecialTokens, max_patches_per_side: int,
              max_latent_size: int, reweight_ce: bool, interpolate_pos: bool = False) -> dict[str, list]:
  """One row's per-token lists, item by item in upstream's order (rope ids, intervals, CE/MSE sets).

  Kept whole: one pass over the items fills the parallel per-token lists together.
  """
  r = {k: [] for k in ("kind", "expert", "rope", "sample", "text", "mode_block", "vit_idx", "vit_pos",
                       "vit_block", "vae_idx", "lat_pos", "vae_img", "vae_noisy", "ce_idx", "ce_lab", "ce_w",
                       "img_noisy", "img_grid", "img_t", "splits")}
  curr = 0
  vit_count = 0
  for s, plan in enumerate(samples):
    rope = 0
    sample_start = curr
    split = None  # the open split: [start, mode, first VAE image of the split]

    def close():
      nonlocal split
      if split is not None:
        r["splits"].append((split[0], curr, split[1], sample_start))
      split = None

    for item in plan:
      if isinstance(item, RopeSkip):
        rope += 1
        continue
      if not (isinstance(item, VaeImage) and not item.split_start and split is not None):
        close()
        split = [curr, None, len(r["img_noisy"])]

      def put(kind: int, expert: int, text_id: int = 0, rope_id: int = 0) -> int:
        nonlocal curr
        r["kind"].append(kind); r["expert"].append(expert); r["rope"].append(rope_id)
        r["sample"].append(s); r["text"].append(text_id)
        curr += 1
        return curr - 1

      def end_marker_loss(item, pos):
        if item.special_token_loss:
          if item.special_token_label is None:
            raise LayoutError("special_token_loss needs special_token_label")
          r["ce_idx"].append(pos); r["ce_lab"].append(int(item.special_token_label)); r["ce_w"].append(1.0)

      if isinstance(item, Text):
        ids = [int(i) for i in item.ids]
        shifted = [tokens.bos_token_id] + ids
        w = len2weight(len(shifted)) if reweight_ce else 1.0
        for j, tid in enumerate(shifted):
          pos = put(TOKEN_TEXT, EXPERT_UND, tid, rope + j)
          if item.loss:
            r["ce_idx"].append(pos); r["ce_lab"].append((ids + [tokens.eos_token_id])[j]); r["ce_w"].append(w)
        pos = put(TOKEN_TEXT, EXPERT_UND, tokens.eos_token_id, rope + len(shifted))
        end_marker_loss(item, pos)
        rope += len(shifted) + 1
        mode = MODE_CAUSAL
      elif isinstance(item, VitImage):
        gh, gw = item.grid
        r["vit_pos"] += _grid_ids(item.grid, max_patches_per_side, interpolate_pos, "ViT image",
                                  "vit_max_num_patch_per_side")
        put(TOKEN_TEXT, EXPERT_UND, tokens.start_of_image, rope)
        vstart = vit_count
        for _ in range(gh * gw):
          r["vit_idx"].append(put(TOKEN_VIT, EXPERT_UND, 0, rope))
        vit_count += gh * gw
        r["vit_block"].extend([(vstart, vit_count)] * (gh * gw))
        pos = put(TOKEN_TEXT, EXPERT_UND, tokens.end_of_image, rope)
        end_marker_loss(item, pos)
        rope += 1
        mode = MODE_FULL
      elif isinstance(item, VaeImage):
        gh, gw = item.grid
        r["lat_pos"] += _grid_ids(item.grid, max_latent_size, interpolate_pos, "VAE image latent", "max_latent_size")
        put(TOKEN_TEXT, EXPERT_UND, tokens.start_of_image, rope)
        img = len(r["img_noisy"])
        r["img_noisy"].append(int(item.loss)); r["img_grid"].append((gh, gw)); r["img_t"].append(split[2])
        for _ in range(gh * gw):
          r["vae_idx"].append(put(TOKEN_VAE, EXPERT_GEN, 0, rope))
          r["vae_img"].append(img); r["vae_noisy"].append(int(item.loss))
        pos = put(TOKEN_TEXT, EXPERT_UND, tokens.end_of_image, rope)
        end_marker_loss(item, pos)
        if item.frame_delta is not None:
          rope += int(item.frame_delta)
        elif not item.loss:
          rope += 1
        mode = MODE_NOISE if item.loss and item.frame_delta is None else MODE_FULL
      else:
        raise LayoutError(f"unknown plan item {item!r}")
      if split[1] is None:  # the split's first item sets its mode (upstream: at split_start)
        split[1] = mode
      if not isinstance(item, VaeImage) or item.split_end:
        close()
    close()  # a clip whose last frame was CFG-dropped ends with the sample
    for sp in r["splits"]:
      if sp[3] == sample_start:
        r["mode_block"].append((sp, curr))
  return r


def _intervals(n: int, splits: list[tuple[tuple[int, int, int, int], int]], t: int):
  k_start = np.zeros(t, np.int32); k_end = np.zeros(t, np.int32)
  q_start = np.zeros(t, np.int32); q_end = np.zeros(t, np.int32)
  for (start, end, mode, sample_start), sample_end in splits:
    idx = np.arange(start, end, dtype=np.int32)
    k_start[start:end] = sample_start
    if mode == MODE_CAUSAL:
      k_end[start:end] = idx + 1
      q_start[start:end] = idx
    else:
      k_end[start:end] = end
      q_start[start:end] = start
    q_end[start:end] = end if mode == MODE_NOISE else sample_end
  return k_start, k_end, q_start, q_end


def position_args(cfg: BagelConfig) -> dict[str, Any]:
  """`pack`'s position-table keywords from a model config: `pack(..., **position_args(cfg))`."""
  return dict(max_patches_per_side=cfg.vit_max_num_patch_per_side, max_latent_size=cfg.max_latent_size,
              interpolate_pos=cfg.interpolate_pos)


def pack(rows: Sequence[Sequence[Plan]], capacity: Capacity, tokens: SpecialTokens, *,
         max_patches_per_side: int, max_latent_size: int, reweight_ce: bool = False,
         interpolate_pos: bool = False) -> Layout:
  """Packs `rows` (each a list of sample plans) into a Layout of shape [len(rows), capacity.tokens].

  interpolate_pos: upstream's interpolated position ids (`BagelConfig.interpolate_pos`), else extrapolated.
  """
  t = capacity.tokens
  packed = [_pack_row(r, tokens, max_patches_per_side, max_latent_size, reweight_ce, interpolate_pos) for r in rows]

  def cap(name: str, need: int) -> int:
    c = getattr(capacity, name)
    if c is None:
      return need
    if need > c:
      raise LayoutError(f"row needs {need} {name} slots but Capacity.{name}={c}")
    return c

  b = len(rows)
  lens = [len(p["kind"]) for p in packed]
  cap("tokens", max(lens, default=0))
  sizes = {
      "und": cap("und", max((sum(1 for k, e in zip(p["kind"], p["expert"]) if e == EXPERT_UND) for p in packed), default=0)),
      "gen": cap("gen", max((sum(1 for e in p["expert"] if e == EXPERT_GEN) for p in packed), default=0)),
      "vit": cap("vit", max((len(p["vit_idx"]) for p in packed), default=0)),
      "vae": cap("vae", max((len(p["vae_idx"]) for p in packed), default=0)),
      "ce": cap("ce", max((len(p["ce_idx"]) for p in packed), default=0)),
      "vae_images": cap("vae_images", max((len(p["img_noisy"]) for p in packed), default=0)),
  }

  def arr(shape, fill, dtype=np.int32):
    return np.full((b,) + shape, fill, dtype)

  out = {
      "token_kind": arr((t,), TOKEN_PAD), "expert": arr((t,), EXPERT_UND), "rope_ids": arr((t,), 0),
      "sample_ids": arr((t,), -1), "text_ids": arr((t,), 0),
      "k_start": arr((t,), 0), "k_end": arr((t,), 0), "q_start": arr((t,), 0), "q_end": arr((t,), 0),
      "und_indexes": arr((sizes["und"],), t), "gen_indexes": arr((sizes["gen"],), t),
      "vit_indexes": arr((sizes["vit"],), t), "vit_position_ids": arr((sizes["vit"],), 0),
      "vit_block_start": arr((sizes["vit"],), 0), "vit_block_end": arr((sizes["vit"],), 0),
      "vae_indexes": arr((sizes["vae"],), t), "latent_position_ids": arr((sizes["vae"],), 0),
      "vae_image_ids": arr((sizes["vae"],), -1), "vae_noisy": arr((sizes["vae"],), 0),
      "ce_indexes": arr((sizes["ce"],), t), "ce_labels": arr((sizes["ce"],), 0),
      "ce_weights": arr((sizes["ce"],), 0.0, np.float32),
      "vae_image_noisy": arr((sizes["vae_images"],), 0), "vae_image_grid": arr((sizes["vae_images"], 2), 0),
      "vae_image_timestep": np.tile(np.arange(sizes["vae_images"], dtype=np.int32), (b, 1)),
  }
  for i, p in enumerate(packed):
    n = lens[i]
    out["token_kind"][i, :n] = p["kind"]; out["expert"][i, :n] = p["expert"]
    out["rope_ids"][i, :n] = p["rope"]; out["sample_ids"][i, :n] = p["sample"]; out["text_ids"][i, :n] = p["text"]
    ks, ke, qs, qe = _intervals(n, p["mode_block"], t)
    out["k_start"][i], out["k_end"][i], out["q_start"][i], out["q_end"][i] = ks, ke, qs, qe
    kinds = np.asarray(p["kind"], np.int32)
    experts = np.asarray(p["expert"], np.int32)
    und = np.nonzero((experts == EXPERT_UND) & (kinds != TOKEN_PAD))[0]
    gen = np.nonzero(experts == EXPERT_GEN)[0]
    out["und_indexes"][i, :len(und)] = und; out["gen_indexes"][i, :len(gen)] = gen
    nv = len(p["vit_idx"])
    out["vit_indexes"][i, :nv] = p["vit_idx"]; out["vit_position_ids"][i, :nv] = p["vit_pos"]
    if nv:
      blocks = np.asarray(p["vit_block"], np.int32)
      out["vit_block_start"][i, :nv], out["vit_block_end"][i, :nv] = blocks[:, 0], blocks[:, 1]
    nl = len(p["vae_idx"])
    out["vae_indexes"][i, :nl] = p["vae_idx"]; out["latent_position_ids"][i, :nl] = p["lat_pos"]
    out["vae_image_ids"][i, :nl] = p["vae_img"]; out["vae_noisy"][i, :nl] = p["vae_noisy"]
    nc = len(p["ce_idx"])
    out["ce_indexes"][i, :nc] = p["ce_idx"]; out["ce_labels"][i, :nc] = p["ce_lab"]; out["ce_weights"][i, :nc] = p["ce_w"]
    ni = len(p["img_noisy"])
    out["vae_image_noisy"][i, :ni] = p["img_noisy"]
    out["vae_image_timestep"][i, :ni] = p["img_t"]
    if ni:
      out["vae_image_grid"][i, :ni] = np.asarray(p["img_grid"], np.int32)
  return Layout(**out)


def dense_mask_np(layout: Layout, row: int = 0) -> np.ndarray:
  """The row's [T, T] boolean mask from its intervals (for tests and debugging)."""
  ks, ke, qs, qe = (np.asarray(getattr(layout, n))[row] for n in ("k_start", "k_end", "q_start", "q_end"))
  t = ks.shape[0]
  q = np.arange(t)[:, None]
  k = np.arange(t)[None, :]
  return (ks[:, None] <= k) & (k < ke[:, None]) & (qs[None, :] <= q) & (q < qe[None, :])
