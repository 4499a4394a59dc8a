"""The one table between upstream tensor names/layouts and our parameter tree.

Our parameters are a pure dict `{"bagel": {...}, "vae": {...}}` (the pure-dict form of
the NNX states of `Bagel` and `AutoEncoder`).  Each `Rule` maps one upstream tensor
(`file` is "ema" for ema.safetensors, "ae" for ae.safetensors) to a parameter path,
optionally to one slice `index` of a stacked parameter (layer, expert), with a layout
transform.  `to_ours` / `to_upstream` apply a transform in either direction; the loader
and the converters only ever go through this table.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from bagel_jax.config import BagelConfig

# Layout transforms: upstream layout -> ours.
IDENTITY = "identity"
LINEAR = "linear"  # torch Linear weight [out, in] -> kernel [in, out]
CONV = "conv"  # torch Conv2d weight [O, I, kh, kw] -> kernel [kh, kw, I, O]


@dataclasses.dataclass(frozen=True)
class Rule:
  upstream: str
  path: tuple[str, ...]
  kind: str = IDENTITY
  index: tuple[int, ...] = ()  # slice of a stacked parameter (e.g. (layer, expert))
  file: str = "ema"


def to_ours(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == IDENTITY:
    return x
  if kind == LINEAR:
    return np.ascontiguousarray(x.T)
  if kind == CONV:
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  raise ValueError(f"unknown layout transform {kind!r}")


def to_upstream(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == IDENTITY:
    return x
  if kind == LINEAR:
    return np.ascontiguousarray(x.T)
  if kind == CONV:
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  raise ValueError(f"unknown layout transform {kind!r}")


def upstream_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
  if kind == IDENTITY:
    return tuple(ours)
  if kind == LINEAR:
    return tuple(reversed(ours))
  if kind == CONV:
    kh, kw, i, o = ours
    return (o, i, kh, kw)
  raise ValueError(f"unknown layout transform {kind!r}")


# ----------------------------------------------------------------------------- VAE (ae.safetensors)
def _vae_rules(cfg: BagelConfig) -> Iterator[Rule]:
  raise NotImplementedError  # filled in by the autoencoder work


def rules(cfg: BagelConfig) -> list[Rule]:
  """Every upstream tensor of the release layout, for this config."""
  return [*_vae_rules(cfg)]
