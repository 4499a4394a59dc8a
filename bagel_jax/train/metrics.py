"""Training metrics: FLOP counts for the MFU estimate, and the writer of metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib

import numpy as np

_log = logging.getLogger("bagel_jax.train")

_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "v5p": 459.0, "v5 lite": 197.0, "v5e": 197.0,
                "v4": 275.0, "v6": 918.0}


def peak_flops(config) -> float | None:
  import jax

  if float(config.train.peak_tflops) > 0:
    return float(config.train.peak_tflops) * 1e12 * jax.device_count()
  kind = jax.devices()[0].device_kind.lower()
  for k, v in _PEAK_TFLOPS.items():
    if k in kind:
      return v * 1e12 * jax.device_count()
  return None


def truncate_rows(path: pathlib.Path, last_step: int) -> int:
  """Drops the rows of `path` (metrics.jsonl) after `last_step` and any line a killed run left
  half-written; returns how many were dropped. The file is replaced atomically."""
  if not path.is_file():
    return 0
  keep, dropped = [], 0
  for line in path.read_text().splitlines():
    try:
      ok = int(json.loads(line)["step"]) <= last_step
    except (ValueError, KeyError, TypeError):
      ok = False
    keep.append(line) if ok else None
    dropped += not ok
  if dropped:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{ln}\n" for ln in keep))
    os.replace(tmp, path)
  return dropped


class MetricsWriter:
  """metrics.jsonl and TensorBoard: exactly one row per logged step, also across resumes (rows
  after the restored step `start` are dropped; TensorBoard purges them with `purge_step`)."""

  def __init__(self, workdir: pathlib.Path, enabled: bool, start: int = 0):
    self.enabled = enabled
    self.file = None
    self.tb = None
    if enabled:
      truncate_rows(workdir / "metrics.jsonl", start)
      self.file = open(workdir / "metrics.jsonl", "a")
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(workdir / "tb"), purge_step=start + 1)
      except Exception as e:  # noqa: BLE001
        _log.warning("no TensorBoard logs: %s", e)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self.file.write(json.dumps({"step": step, **metrics}) + "\n")
    self.file.flush()
    if self.tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(f"train/{k}", v, step)
      self.tb.flush()

  def close(self) -> None:
    if self.file:
      self.file.close()
    if self.tb is not None:
      self.tb.close()


def tokens_sq(layout) -> float:
  """Sum over packed samples of length^2 (for the attention FLOP estimate)."""
  sid = np.asarray(layout.sample_ids)
  total = 0.0
  for row in sid:
    _, counts = np.unique(row[row >= 0], return_counts=True)
    total += float(np.sum(counts.astype(np.float64) ** 2))
  return total
