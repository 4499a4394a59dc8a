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


def flops_per_token(cfg) -> float:
  """Training FLOPs per LLM token: 6 x the parameters one token passes through (one expert)."""
  llm = cfg.llm
  d, f, hd = llm.hidden_size, llm.intermediate_size, llm.head_dim
  per_layer = d * (llm.num_attention_heads * hd) * 2 + d * (llm.num_key_value_heads * hd) * 2 + 3 * d * f
  return 6.0 * llm.num_hidden_layers * per_layer


def attention_flops(cfg, sum_sq_len: float) -> float:
  """fwd+bwd attention score/value FLOPs for samples of these lengths (masked blocks counted as half)."""
  llm = cfg.llm
  return 6.0 * llm.num_hidden_layers * llm.num_attention_heads * llm.head_dim * sum_sq_len


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
