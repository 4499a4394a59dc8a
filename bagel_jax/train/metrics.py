"""Training metrics: FLOP counts for the MFU estimate, and the writer of metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import logging
import math
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


class MetricsWriter:

  def __init__(self, workdir: pathlib.Path, enabled: bool):
    self.enabled = enabled
    self.file = open(workdir / "metrics.jsonl", "a") if enabled else None
    self.tb = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(workdir / "tb"))
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
