"""The optax optimizer of a training config (upstream: AdamW b1 0.9, b2 0.95, eps 1e-15, wd 0, clip 1.0).

    tx, schedule = make_optimizer(config.optim, params_bagel, total_steps)

- Learning rate: linear warmup from 0 over `warmup_steps`, then `constant` or `cosine` down to
  `min_lr` at `total_steps` (upstream's `get_constant_schedule_with_warmup` /
  `get_cosine_with_min_lr_schedule_with_warmup`). The schedule counts *applied* updates (a
  skipped non-finite step does not advance it).
- Global-norm clipping at `clip` over the trainable gradients only, then AdamW.
- Frozen subtrees (`frozen_patterns`): their leaves get `optax.set_to_zero()` through
  `optax.multi_transform`, so they hold no Adam moments (freeze_llm on the 7B model saves
  twice the LLM's size in optimizer state). The train step is given the same patterns
  (`StepConfig.frozen`), so their gradients are zeroed before the norm and not computed at all.
  - freeze_vit: the SigLIP ViT and the connector (upstream freezes `vit_model`; its connector is
    trained, so `freeze_vit_connector` is separate and off by default).
  - freeze_llm: the whole language model (`llm/`: embeddings, both experts, norms, lm_head).
  - freeze_und: upstream *detaches the und-token activations* inside the MoT layers, so the und
    weights receive no gradient. Here it is done on the weights instead: the und expert's slices
    (index 0 of the expert axis) of every stacked MoT weight, the und final norm, the token
    embedding, the ViT and the connector get zero updates (`expert_slice_mask`), the gen expert
    and the generation heads train. The one difference: gradients that reach gen weights
    *through* und activations (text tokens attending to clean VAE tokens) still flow here.
- The two sin-cos position tables are always frozen (`step.FROZEN_TABLES`).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bagel_jax.train.step import FROZEN_TABLES, path_str

PyTree = Any

FREEZE_PATTERNS = {
    "freeze_vit": (r"^vit/",),
    "freeze_vit_connector": (r"^connector/",),
    "freeze_llm": (r"^llm/",),
}
# freeze_und: whole leaves that only und tokens use, plus the und slice of every MoT weight.
FREEZE_UND_LEAVES = (r"^vit/", r"^connector/", r"^llm/embed_tokens$")
MOT_STACKED = r"^llm/layers/"  # [L, 2, ...]: expert axis 1
UND_NORM = r"^llm/norm$"  # [2, D]: expert axis 0


class OptimConfigError(ValueError):
  pass


def schedule(cfg, total_steps: int) -> optax.Schedule:
  lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
  kind = str(cfg.schedule)
  if kind == "constant":
    if warmup <= 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if kind == "cosine":
    if total_steps <= warmup:
      raise OptimConfigError(f"cosine schedule: total steps {total_steps} must exceed warmup_steps {warmup}")
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=float(cfg.min_lr))
  raise OptimConfigError(f"optim.schedule={kind!r}: expected 'constant' or 'cosine'")


def frozen_patterns(cfg) -> tuple[str, ...]:
  """Regexes of whole frozen leaves (always the sin-cos tables), for the optimizer and the step."""
  pats = list(FROZEN_TABLES)
  for flag, p in FREEZE_PATTERNS.items():
    if bool(cfg.get(flag, False)):
      pats.extend(p)
  if bool(cfg.get("freeze_und", False)):
    pats.extend(FREEZE_UND_LEAVES)
  return tuple(dict.fromkeys(pats))


def _labels(params: PyTree, patterns: tuple[str, ...]) -> PyTree:
  regs = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if any(r.search(path_str(p)) for r in regs) else "train", params)


def und_slice_multiplier(path: str, ndim: int) -> jax.Array | None:
  """freeze_und: 0 on the und expert's slice of a stacked MoT weight or of the final norm, else None."""
  if re.search(MOT_STACKED, path):
    return jnp.asarray([0.0, 1.0], jnp.float32).reshape((1, 2) + (1,) * (ndim - 2))
  if re.search(UND_NORM, path):
    return jnp.asarray([0.0, 1.0], jnp.float32).reshape((2,) + (1,) * (ndim - 1))
  return None


def zero_und_slices() -> optax.GradientTransformation:
  """Zeroes the und expert's slices of gradients/updates (stateless; see freeze_und above)."""

  def update(updates, state, params=None):
    del params

    def one(path, u):
      m = und_slice_multiplier(path_str(path), u.ndim)
      return u if m is None else (u * m).astype(u.dtype)

    return jax.tree_util.tree_map_with_path(one, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg, params: PyTree, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The full transformation for the trainable "bagel" tree (`params` may be abstract)."""
  sched = schedule(cfg, total_steps)
  for k in ("b1", "b2"):
    if not 0.0 <= float(cfg[k]) < 1.0:
      raise OptimConfigError(f"optim.{k}={cfg[k]} must be in [0, 1)")
  inner = [optax.clip_by_global_norm(float(cfg.clip))] if float(cfg.clip) > 0 else []
  inner.append(optax.adamw(sched, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.weight_decay)))
  if bool(cfg.get("freeze_und", False)):
    inner = [zero_und_slices()] + inner + [zero_und_slices()]
  labels = _labels(params, frozen_patterns(cfg))
  tx = optax.multi_transform({"train": optax.chain(*inner), "frozen": optax.set_to_zero()}, labels)
  return tx, sched


def current_lr(sched: optax.Schedule, opt_state: PyTree) -> jax.Array:
  """The learning rate of the next update (from the AdamW count inside the state)."""
  counts = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(x, optax.ScaleByAdamState)]
  count = counts[0].count if counts else jnp.zeros((), jnp.int32)
  return sched(count)


def count_params(params: PyTree, patterns: tuple[str, ...]) -> tuple[int, int]:
  """(trainable, frozen) parameter counts."""
  labels = _labels(params, patterns)
  n = {"train": 0, "frozen": 0}
  for x, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
    n[lab] += int(x.size)
  return n["train"], n["frozen"]
