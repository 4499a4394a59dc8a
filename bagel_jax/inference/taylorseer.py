"""TaylorSeer step caching for the flow sampler (upstream PR #232, `modeling/cache_utils/taylorseer.py`).

On some denoising calls the LLM runs in full; on the others its output is forecast by a Taylor
series of features cached at the full calls.  Upstream keeps one cache per CFG branch (cond,
cfg_text, cfg_img), each with its own call counter that advances only when that branch runs, so a
branch whose CFG interval starts late follows its own schedule (there is no global step counter).

Call k of a branch (k counts that branch's calls from 0):
- full if k < first_enhance; afterwards a counter c (0 after a full call, +1 after a forecast)
  makes it full when c == fresh_threshold - 1, else a forecast ("Taylor");
- a full call refreshes the factors from the new feature h: F0 = h, then
  F_{o+1} = (F_o(new) - F_o(old)) / (k - k_prev) for o < max_order while the old cache holds F_o
  and k > first_enhance - 2 (else the cache keeps F0 only);
- a forecast returns sum_o F_o x^o / o! with x = k - k_last_full.
Upstream caches every decoder layer's output, but a forecast layer ignores its input, so only the
last layer's forecast reaches the velocity: caching the last layer's output at the latent tokens
is output-equivalent, and is what is stored here (upstream: one copy of the query per layer).
All state is a `TaylorState` carried through the sampler's `lax.scan`; every request starts from
`init_state` (upstream leaves its state on the model and the next request fails: not reproduced).

Beyond upstream (off by default; `mode`, `fresh_tolerance`; measured in docs/benchmarks.md):
- mode "flow_time": the same schedule, but differences and forecast distances in flow time t (the
  shifted, non-uniform grid) instead of call counts (upstream's commented-out alternative), with
  float32 factors; the same full forwards at a lower error;
- mode "velocity": as "flow_time", but the cached feature is each branch's velocity (llm2vae
  output, p*p*z = 64 channels) instead of the LLM hidden state: the cache is hidden_size / 64 times
  smaller (56x for the 7B model) and a forecast also skips the final norm and llm2vae;
- fresh_tolerance > 0: adaptive refresh. The interval between full calls starts at
  fresh_threshold; at each full call past first_enhance the relative error the forecast would have
  made there is measured, and the interval grows by one call if it is within the tolerance, else
  shrinks by one (between 1 and 2 x fresh_threshold).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bagel_jax.inference.errors import InferenceError

MODES = ("upstream", "flow_time", "velocity")

# Call types as recorded per step and branch (the fixture's `step_type`).
NOT_RUN, FULL, TAYLOR = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class TaylorSeerSettings:
  """Upstream's `cache_init` values (fresh_threshold 3, max_order 6, first_enhance 5) and this port's variants."""

  fresh_threshold: int = 3
  max_order: int = 6
  first_enhance: int = 5
  mode: str = "upstream"
  fresh_tolerance: float = 0.0

  def validate(self) -> "TaylorSeerSettings":
    for name, low in (("fresh_threshold", 1), ("max_order", 0), ("first_enhance", 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InferenceError(f"TaylorSeer {name} must be an integer >= {low}; got {value!r}")
    if self.mode not in MODES:
      raise InferenceError(f"TaylorSeer mode must be one of {MODES}; got {self.mode!r}")
    tol = self.fresh_tolerance
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0.0 <= float(tol) < math.inf:
      raise InferenceError(f"TaylorSeer fresh_tolerance must be a finite number >= 0 (0: off); got {tol!r}")
    return self

  @property
  def caches_velocity(self) -> bool:
    return self.mode == "velocity"

  @property
  def in_flow_time(self) -> bool:
    return self.mode != "upstream"


def from_options(enable_taylorseer: bool, *, fresh_threshold: int = 3, max_order: int = 6, first_enhance: int = 5,
                 taylorseer_mode: str = "upstream", fresh_tolerance: float = 0.0) -> TaylorSeerSettings | None:
  """The sampler's setting from the Inferencer's / command line's options (None: no caching); checked."""
  TaylorSeerSettings(fresh_threshold=fresh_threshold, max_order=max_order, first_enhance=first_enhance,
                     mode=taylorseer_mode, fresh_tolerance=fresh_tolerance).validate()
  if not enable_taylorseer:
    return None
  return TaylorSeerSettings(fresh_threshold=int(fresh_threshold), max_order=int(max_order),
                            first_enhance=int(first_enhance), mode=str(taylorseer_mode),
                            fresh_tolerance=float(fresh_tolerance))


class TaylorState(NamedTuple):
  """One cache per CFG branch: factors [C, max_order + 1, B, N, D]; the rest [C]."""

  factors: jax.Array
  n_terms: jax.Array  # factors held (0: empty)
  calls: jax.Array  # the branch's call counter k (upstream `current['step']`)
  counter: jax.Array  # forecasts since the last full call (upstream `cache_counter`)
  last_full: jax.Array  # k of the last full call (upstream `activated_steps[-1]`)
  last_full_t: jax.Array  # t of the last full call (flow-time modes)
  interval: jax.Array  # calls per full call after first_enhance (fresh_threshold; adapted with fresh_tolerance)


def init_state(settings: TaylorSeerSettings, branches: int, feature_shape: tuple[int, ...], dtype) -> TaylorState:
  """A fresh cache (every request starts here). Factors in the feature's dtype (upstream), float32 in the variants."""
  dtype = jnp.float32 if settings.in_flow_time else dtype
  z = jnp.zeros((branches,), jnp.int32)
  zf = jnp.zeros((branches,), jnp.float32)
  factors = jnp.zeros((branches, settings.max_order + 1) + tuple(feature_shape), dtype)
  return TaylorState(factors, z, z, z, zf, zf, jnp.full((branches,), settings.fresh_threshold, jnp.int32))


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _distance(settings: TaylorSeerSettings, state: TaylorState, t: jax.Array) -> jax.Array:
  """Per branch: calls since the last full call (upstream), or flow time since it (the variants)."""
  if settings.in_flow_time:
    return t - state.last_full_t
  return state.calls.astype(jnp.float32) - state.last_full


def forecast(settings: TaylorSeerSettings, state: TaylorState, t: jax.Array) -> jax.Array:
  """The forecast feature [C, B, N, D] of every branch (upstream `taylor_formula`)."""
  x = _distance(settings, state, t)
  out = None
  for o in range(settings.max_order + 1):  # summed from o = 0 upward, as upstream
    f = state.factors[:, o]
    # Upstream: (1 / o!) * F_o * x^o, in the factors' dtype; orders the cache does not hold count 0.
    power = _bcast(jnp.where(o < state.n_terms, x ** o, 0.0).astype(f.dtype), f)
    term = f * jnp.asarray(1.0 / math.factorial(o), f.dtype) * power
    out = term if out is None else out + term
  return out


def call_types(settings: TaylorSeerSettings, state: TaylorState, active: jax.Array) -> jax.Array:
  """Per branch: FULL, TAYLOR, or NOT_RUN where the branch does not run (upstream `cal_type`)."""
  first = state.calls < settings.first_enhance
  due = state.counter >= state.interval - 1
  kind = jnp.where(first | due, FULL, TAYLOR)
  return jnp.where(active, kind, NOT_RUN).astype(jnp.int32)


def _refresh(settings: TaylorSeerSettings, state: TaylorState, feature: jax.Array, t: jax.Array) -> jax.Array:
  """Every branch's factors as a full call would set them (upstream `derivative_approximation`)."""
  old = state.factors
  feature = feature.astype(old.dtype)
  dist = _bcast(_distance(settings, state, t).astype(old.dtype), feature)  # k - k_prev (or t - t_prev)
  new = [feature]
  for o in range(settings.max_order):
    new.append((new[o] - old[:, o]) / dist)
  grow = state.calls > settings.first_enhance - 2
  n_new = 1 + jnp.where(grow, jnp.minimum(state.n_terms, settings.max_order), 0)
  fresh = jnp.stack(new, axis=1)
  keep = _bcast(jnp.arange(settings.max_order + 1)[None, :] < n_new[:, None], fresh)
  return jnp.where(keep, fresh, jnp.zeros_like(fresh)), n_new  # orders not held (and 0/0 at call 0) zeroed


def _relative_error(feature: jax.Array, guess: jax.Array) -> jax.Array:
  axes = tuple(range(1, feature.ndim))
  f = feature.astype(jnp.float32)
  d = f - guess.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(d * d, axis=axes)) / (jnp.sqrt(jnp.sum(f * f, axis=axes)) + 1e-12)


def _adapt(settings: TaylorSeerSettings, state: TaylorState, full: jax.Array, feature: jax.Array,
           guess: jax.Array) -> jax.Array:
  """Adaptive refresh: the next interval from the error the forecast would have made at this full call."""
  if settings.fresh_tolerance <= 0:
    return state.interval
  ok = _relative_error(feature, guess) <= settings.fresh_tolerance
  judged = full & (state.calls >= settings.first_enhance)
  grown = jnp.clip(state.interval + jnp.where(ok, 1, -1), 1, 2 * settings.fresh_threshold)
  return jnp.where(judged, grown, state.interval)


def advance(settings: TaylorSeerSettings, state: TaylorState, kind: jax.Array, feature: jax.Array,
            guess: jax.Array, t: jax.Array) -> TaylorState:
  """The state after this call: full branches refresh their factors, every branch that ran counts the call.

  feature: the computed features [C, B, N, D] (used where kind is FULL); guess: this call's forecast.
  """
  full, taylor = kind == FULL, kind == TAYLOR
  fresh, n_new = _refresh(settings, state, feature, t)
  return TaylorState(
      factors=jnp.where(_bcast(full, fresh), fresh, state.factors),
      n_terms=jnp.where(full, n_new, state.n_terms),
      calls=state.calls + (kind != NOT_RUN).astype(jnp.int32),
      counter=jnp.where(full, 0, jnp.where(taylor, state.counter + 1, state.counter)),
      last_full=jnp.where(full, state.calls.astype(jnp.float32), state.last_full),
      last_full_t=jnp.where(full, t, state.last_full_t),
      interval=_adapt(settings, state, full, feature, guess))


def record(state: TaylorState, kind: jax.Array, after: TaylorState) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(step_type, branch_step, n_terms) of this call per branch, as upstream's recorded run lists them:
  the branch's counter (-1: not run) and its factor count after a full call / used by a forecast."""
  step = jnp.where(kind != NOT_RUN, state.calls, -1)
  terms = jnp.where(kind == FULL, after.n_terms, jnp.where(kind == TAYLOR, state.n_terms, 0))
  return kind, step, terms


__all__ = ["TaylorSeerSettings", "TaylorState", "MODES", "NOT_RUN", "FULL", "TAYLOR", "from_options", "init_state",
           "forecast", "call_types", "advance", "record"]
