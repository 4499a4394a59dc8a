"""The trainer's config checks made before anything compiles: known keys, value ranges, buffer sizes.

Each refusal is one `TrainConfigError` line naming the field, the value and what is allowed:

    check_keys(config)             # every key exists in base_config() (free-form dicts excepted)
    check_ranges(config)           # learning rates, betas, eps, decay, clip, EMA, steps, keep, rows, ...
    check_capacity(config, cfg)    # a row can hold one sample of every data group
    check_batch_memory(config, cfg)  # one batch's host buffers fit in memory
    check_skipped(info, fraction)    # at run time: corrupt records up to data.max_skip_fraction
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable

from bagel_jax.train.config import TrainConfigError, base_config

# Dicts whose keys are the user's (data group names, logical axis names), not the trainer's.
FREE_FORM = ("data.groups", "train.sharding_rules")


# ----------------------------------------------------------------------------- keys
def _closest(name: str, candidates: list[str]) -> str | None:
  near = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
  return near[0] if near else None


def unknown_key(config, base=None, prefix: str = "") -> tuple[str, str | None] | None:
  """(the first key of `config` missing from `base`, the closest existing key) or None."""
  base = base_config() if base is None else base
  for key in sorted(config.keys()):
    path = f"{prefix}{key}"
    if key not in base:
      near = _closest(key, list(base.keys()))
      return path, (f"{prefix}{near}" if near else None)
    if path in FREE_FORM:
      continue
    sub, sub_base = config[key], base[key]
    if hasattr(sub, "keys") and hasattr(sub_base, "keys"):
      found = unknown_key(sub, sub_base, f"{path}.")
      if found:
        return found
  return None


def check_keys(config) -> None:
  """Refuses a key no part of the trainer reads (a typo in a config file), naming the closest key."""
  found = unknown_key(config)
  if found is None:
    return
  key, near = found
  section = key.rsplit(".", 1)[0] if "." in key else "the config"
  hint = f"; did you mean {near}?" if near else f" ({section} has no such key)"
  raise TrainConfigError(f"unknown config key {key!r}{hint}")


# ----------------------------------------------------------------------------- value ranges
def _num(config, path: str) -> float:
  node: Any = config
  for part in path.split("."):
    node = node[part]
  try:
    return float(node)
  except (TypeError, ValueError):
    raise TrainConfigError(f"{path}={node!r}: expected a number") from None


# (field, test, allowed range as said to the user); the test gets a finite float.
RULES: list[tuple[str, Callable[[float], bool], str]] = [
    ("optim.lr", lambda v: v >= 0, "a finite number >= 0"),
    ("optim.min_lr", lambda v: v >= 0, "a finite number >= 0"),
    ("optim.warmup_steps", lambda v: v >= 0 and v == int(v), "an integer >= 0"),
    ("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.eps", lambda v: v > 0, "a finite number > 0"),
    ("optim.weight_decay", lambda v: v >= 0, "a finite number >= 0"),
    ("optim.clip", lambda v: v > 0, "a finite number > 0 (the global-norm clip; upstream 1.0)"),
    ("train.steps", lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    ("train.log_every", lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    ("train.save_every", lambda v: v >= 0 and v == int(v), "an integer >= 0 (0: only at the end)"),
    ("train.keep", lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    ("train.ema_decay", lambda v: 0 <= v <= 1, "in [0, 1] (0: no EMA)"),
    ("train.max_nonfinite_streak", lambda v: v >= 0 and v == int(v), "an integer >= 0 (0: never stop)"),
    ("train.timestep_shift", lambda v: v > 0, "a finite number > 0"),
    ("data.rows", lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    ("data.capacity.tokens", lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    ("data.expected_tokens", lambda v: v >= 0 and v == int(v), "an integer >= 0 (0: = capacity.tokens)"),
    ("data.max_tokens_per_sample", lambda v: v >= 0 and v == int(v), "an integer >= 0 (0: no limit)"),
    ("data.workers", lambda v: v >= 0 and v == int(v), "an integer >= 0"),
    ("data.text_cond_dropout", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.vit_cond_dropout", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.vae_cond_dropout", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.vae_min_size", lambda v: v >= 1, "an integer >= 1"),
    ("data.vae_max_size", lambda v: v >= 1, "an integer >= 1"),
    ("data.vit_min_size", lambda v: v >= 1, "an integer >= 1"),
    ("data.vit_max_size", lambda v: v >= 1, "an integer >= 1"),
    ("data.max_skip_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("vae_stage.steps", lambda v: v >= 0 and v == int(v), "an integer >= 0"),
    ("vae_stage.batch", lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    ("vae_stage.lr", lambda v: v >= 0, "a finite number >= 0"),
    ("eval.num_steps", lambda v: v >= 1 and v == int(v), "an integer >= 1"),
]
CAPACITY_FIELDS = ("und", "gen", "vit", "vae", "ce", "vae_images")


def _has(config, path: str) -> bool:
  node: Any = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def check_ranges(config) -> None:
  """Every numeric hyper-parameter in its allowed range (non-finite values refused everywhere)."""
  for path, ok, allowed in RULES:
    if not _has(config, path):
      continue
    v = _num(config, path)
    if not math.isfinite(v) or not ok(v):
      raise TrainConfigError(f"{path}={v:g}: must be {allowed}")
  for k in CAPACITY_FIELDS:
    v = _num(config, f"data.capacity.{k}")
    if not math.isfinite(v) or v < 0 or v != int(v):
      raise TrainConfigError(f"data.capacity.{k}={v:g}: must be an integer >= 0 (0: as capacity.tokens)")
  for lo, hi in (("vae_min_size", "vae_max_size"), ("vit_min_size", "vit_max_size")):
    if _num(config, f"data.{lo}") > _num(config, f"data.{hi}"):
      raise TrainConfigError(f"data.{lo}={config.data[lo]} is larger than data.{hi}={config.data[hi]}")
  tokens, expected = int(config.data.capacity.tokens), int(config.data.expected_tokens)
  if expected > tokens:
    raise TrainConfigError(f"data.expected_tokens={expected}: must be at most data.capacity.tokens={tokens}")


# ----------------------------------------------------------------------------- a row holds a sample
VAE_TASKS = ("t2i",)  # formats / tasks whose samples hold a VAE image (t2i_parquet, edit_parquet too)


def _needs(g: dict) -> tuple[bool, bool]:
  """(needs a VAE image, needs a ViT image) for one sample of a data group."""
  fmt = g.get("format", "")
  if fmt in ("t2i_parquet",):
    return True, False
  if fmt == "edit_parquet":
    return True, True
  if fmt == "vlm_jsonl":
    return False, False  # text-only conversations are valid samples
  task = g.get("task", "t2i")
  return task == "t2i", task in ("vlm", "qa")


def min_sample(config, cfg, g: dict) -> dict[str, int]:
  """Lower bounds of one sample's needs: its smallest images (min sizes, square) and 4 text tokens."""
  vae_side = max(1, int(g.get("vae_min_size") or config.data.vae_min_size) // cfg.latent_downsample)
  vit_side = max(1, int(g.get("vit_min_size") or config.data.vit_min_size) // cfg.vit.patch_size)
  vae, vit = _needs(g)
  need = {"vae": vae_side * vae_side if vae else 0, "vit": vit_side * vit_side if vit else 0,
          "vae_images": 1 if vae else 0}
  need["tokens"] = need["vae"] + need["vit"] + 4
  return need


def check_capacity(config, cfg) -> None:
  """Refuses capacities that cannot hold even the smallest sample of some data group."""
  from bagel_jax.data.pipeline import capacity
  cap = capacity(config.data)
  for name, g in sorted(config.data.groups.items()):
    if float(dict(g).get("weight", 1.0)) <= 0:
      continue
    for field, n in min_sample(config, cfg, dict(g)).items():
      have = getattr(cap, field)
      if n > have:
        raise TrainConfigError(f"data.capacity.{field}={have} cannot hold one sample of data group {name!r} "
                               f"(its smallest sample needs {n}); raise data.capacity.{field}")


# ----------------------------------------------------------------------------- one batch fits memory
def batch_bytes(config, cfg, process_count: int = 1) -> int:
  """Host bytes of one process's packed batch (the layout's index arrays, ViT patches, padded VAE images)."""
  from bagel_jax.data.pipeline import capacity, image_limits
  cap = capacity(config.data)
  vae_side, _ = image_limits(config.data, cfg)
  per_token = 9  # token kind, expert, rope id, sample id, text id, and the four attention bounds
  index = cap.und + cap.gen + 4 * cap.vit + 3 * cap.vae + 2 * cap.ce + 5 * cap.vae_images
  patches = cap.vit * cfg.vit.patch_dim
  images = cap.vae_images * vae_side * vae_side * 3
  rows = max(1, int(config.data.rows) // max(1, process_count))
  return rows * 4 * (per_token * cap.tokens + index + patches + images)


def host_memory() -> int:
  import psutil
  return int(psutil.virtual_memory().total)


BATCHES_IN_FLIGHT = 3  # the batch being packed, the one being copied to the devices, the one training


def check_batch_memory(config, cfg, process_count: int = 1, limit: int | None = None) -> None:
  """Refuses capacities whose batch buffers (a few batches in flight) would not fit in host memory."""
  limit = host_memory() // 2 if limit is None else limit
  need = BATCHES_IN_FLIGHT * batch_bytes(config, cfg, process_count)
  if need > limit:
    raise TrainConfigError(f"data.capacity.tokens={int(config.data.capacity.tokens)} x data.rows={int(config.data.rows)}: "
                           f"the batch buffers need about {need / 2**30:.1f} GiB, more than the limit of "
                           f"{limit / 2**30:.1f} GiB (half of this machine's memory); lower data.capacity or data.rows")


# ----------------------------------------------------------------------------- at run time: corrupt records
MIN_RECORDS_FOR_SKIP_CHECK = 200


def check_skipped(info: dict, max_fraction: float) -> None:
  """Corrupt or unreadable records are skipped and counted; more than `max_fraction` of all the
  records read (after the first few hundred) stops the run in one line with the reasons."""
  skipped = int(info.get("skipped", 0))
  total = skipped + sum(int(v) for v in info.get("samples_per_group", {}).values())
  if total >= MIN_RECORDS_FOR_SKIP_CHECK and skipped > max_fraction * total:
    from bagel_jax.data.sources import DataError
    raise DataError(f"{skipped} of {total} records read were corrupt or unreadable, more than "
                    f"data.max_skip_fraction={max_fraction:g} (reasons: {info.get('skip_reasons', {})}); "
                    "check the data, or raise data.max_skip_fraction")
