"""The smallest change of a training recipe that fits a device's memory (pure functions, no compiling).

    model = MemoryModel.from_compiles(base, state_bytes, temp_bytes, temp_at_half_tokens)
    changes = fitting_changes(base, model.predict, limit)     # one per knob, the least change that fits
    best = smallest(changes)                                   # None if nothing fits

A recipe is (fsdp size, packed tokens per device, remat policy).  Three knobs, each searched on
its own from the recipe outward (and fsdp with tokens together): a remat policy that saves more (the least recomputing one that
fits), a larger fsdp size (powers of two), fewer tokens per device (multiples of `TOKEN_STEP`).
The size of a change is the factor it costs the step: fsdp f -> f' needs f'/f as many devices
for the same tokens per device; tokens T -> T' needs T/T' as many steps (or devices) for the same
global batch; a remat policy costs its recomputation (`REMAT_COST`, relative compute of a
train step: `full` recomputes the forward, 4/3).  `smallest` picks the cheapest fitting change.

The memory model (`MemoryModel`) splits a compiled step's per-device bytes into what fsdp shards
(the state: parameters, optimizer, EMA, and their gradients) and the rest (activations and
workspace, linear in tokens per device); `bagel_jax.aot.plan7b` fits it to compiles of the target.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

# Remat policies from the most memory to the least; recompute cost relative to no remat.
REMAT_ORDER = ("none", "dots", "save_attention_out", "full")
REMAT_COST = {"none": 1.0, "dots": 1.1, "save_attention_out": 1.25, "full": 4 / 3}
TOKEN_STEP = 1024
FSDP_MAX = 256


@dataclasses.dataclass(frozen=True)
class Recipe:
  fsdp: int
  tokens: int  # packed tokens per device (one row per device)
  remat: str

  def describe(self) -> str:
    return f"fsdp={self.fsdp}, {self.tokens:,} tokens/device, remat={self.remat}"


@dataclasses.dataclass(frozen=True)
class Change:
  knob: str  # "none" (the recipe fits), "remat", "fsdp", "tokens", "fsdp+tokens"
  recipe: Recipe
  predicted: int  # bytes per device
  cost: float  # factor the change costs the step (1.0: no change)

  def describe(self, base: Recipe) -> str:
    if self.knob == "none":
      return "fits as is"
    if self.knob == "fsdp+tokens":
      return (f"fsdp {base.fsdp} -> {self.recipe.fsdp} and tokens/device {base.tokens:,} -> {self.recipe.tokens:,} "
              f"(x{self.cost:.2f})")
    old, new = {"remat": (base.remat, self.recipe.remat), "fsdp": (base.fsdp, self.recipe.fsdp),
                "tokens": (f"{base.tokens:,}", f"{self.recipe.tokens:,}")}[self.knob]
    name = {"remat": "remat", "fsdp": "fsdp", "tokens": "tokens/device"}[self.knob]
    return f"{name} {old} -> {new} (x{self.cost:.2f})"


@dataclasses.dataclass(frozen=True)
class MemoryModel:
  """bytes(fsdp, tokens, remat) = sharded * base.fsdp / fsdp + fixed + per_token * tokens (+ remat delta)."""
  base: Recipe
  sharded: float  # bytes per device at base.fsdp that fsdp divides (state and its gradients)
  fixed: float  # bytes per device that depend on neither
  per_token: float  # activation bytes per packed token per device
  remat_extra: dict[str, float] = dataclasses.field(default_factory=dict)  # bytes added by a policy vs base

  def predict(self, r: Recipe) -> int:
    extra = self.remat_extra.get(r.remat, 0.0) if r.remat != self.base.remat else 0.0
    return int(self.sharded * self.base.fsdp / r.fsdp + self.fixed + self.per_token * r.tokens + extra)

  @classmethod
  def from_compiles(cls, base: Recipe, total: float, sharded: float, total_at: tuple[int, float] | None = None,
                    remat_extra: dict[str, float] | None = None) -> "MemoryModel":
    """From the compiled total at the recipe, the sharded bytes in it, and optionally the total of a
    compile at other tokens per device (else all unsharded bytes are taken as linear in tokens)."""
    rest = total - sharded
    if total_at is None:
      per_token, fixed = rest / base.tokens, 0.0
    else:
      tokens2, total2 = total_at
      per_token = (total - total2) / (base.tokens - tokens2)
      fixed = rest - per_token * base.tokens
    return cls(base, sharded, fixed, per_token, dict(remat_extra or {}))


def _first(cands: Sequence[Recipe], knob: str, cost: Callable[[Recipe], float], predict, limit: int) -> Change | None:
  for r in cands:
    m = predict(r)
    if m <= limit:
      return Change(knob, r, m, cost(r))
  return None


def fitting_changes(base: Recipe, predict: Callable[[Recipe], int], limit: int, *,
                    fsdp_max: int = FSDP_MAX, token_step: int = TOKEN_STEP) -> list[Change]:
  """[Change("none")] if the recipe fits; else, per knob, the least change of that knob alone that fits,
  then the cheapest change of fsdp and tokens together (for each larger fsdp, the most tokens that fit)."""
  m = predict(base)
  if m <= limit:
    return [Change("none", base, m, 1.0)]
  out = []
  i = REMAT_ORDER.index(base.remat) if base.remat in REMAT_ORDER else len(REMAT_ORDER) - 1
  remats = [dataclasses.replace(base, remat=p) for p in REMAT_ORDER[i + 1:]]
  fsdps, f = [], base.fsdp * 2
  while f <= fsdp_max:
    fsdps.append(dataclasses.replace(base, fsdp=f))
    f *= 2
  tokens = [dataclasses.replace(base, tokens=t) for t in range((base.tokens - 1) // token_step * token_step, 0,
                                                                -token_step)]
  for knob, cands, cost in (
      ("remat", remats, lambda r: REMAT_COST[r.remat] / REMAT_COST.get(base.remat, 1.0)),
      ("fsdp", fsdps, lambda r: r.fsdp / base.fsdp),
      ("tokens", tokens, lambda r: base.tokens / r.tokens)):
    found = _first(cands, knob, cost, predict, limit)
    if found is not None:
      out.append(found)
  # both: for each larger fsdp, the most tokens per device that fit
  both = [_first([dataclasses.replace(r, tokens=t.tokens) for t in tokens], "fsdp+tokens",
                 lambda x: x.fsdp / base.fsdp * base.tokens / x.tokens, predict, limit) for r in fsdps]
  found = [c for c in both if c is not None]
  if found:
    out.append(min(found, key=lambda c: c.cost))
  return out


def smallest(changes: Sequence[Change]) -> Change | None:
  """The cheapest change (ties: the order remat, fsdp, tokens); None if none fits."""
  return min(changes, key=lambda c: c.cost) if changes else None


__all__ = ["Recipe", "Change", "MemoryModel", "REMAT_ORDER", "REMAT_COST", "fitting_changes", "smallest"]
