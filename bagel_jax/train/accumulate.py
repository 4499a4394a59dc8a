"""Gradient accumulation: N micro-batches per optimiser step inside one compiled step.

The step receives the global batch of N x R rows in *interleaved* order: row r * N + n is row r
of micro-batch n (`interleave` builds it on the host).  Each device's contiguous share of rows
then holds its share of every micro-batch, so cutting out micro-batch n (`split_micro`) moves
no data between devices.  A `lax.scan` over the N micro-batches runs the forward and backward
of one micro-batch at a time (activations of one micro-batch live at once) and sums the
gradients in float32.

Normalisation: CE is divided by the CE weight (token count when unweighted) and MSE by the
number of noisy latent tokens of the *whole* accumulated batch, over all micro-batches and
devices (`loss_denominators`, computed from the layout before the scan), so N micro-batches of
R rows give the loss and gradients of one batch of N x R rows.  Upstream (PR #274) instead
normalises each micro-batch by its own token counts and divides the loss by N, which weighs a
micro-batch with few CE tokens as much as one with many.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def interleave(micro_batches: list[PyTree]) -> PyTree:
  """N host micro-batches [R, ...] -> one batch [R * N, ...] with row r * N + n from micro-batch n."""
  n = len(micro_batches)
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs], axis=1).reshape(
      (xs[0].shape[0] * n,) + xs[0].shape[1:]), *micro_batches)


def split_micro(batch: PyTree, n: int) -> PyTree:
  """[R * N, ...] in interleaved order -> [N, R, ...] (micro-batch first, for `lax.scan`)."""
  def one(x):
    if x.shape[0] % n:
      raise ValueError(f"grad_accum_steps={n} does not divide the batch of {x.shape[0]} rows")
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
  return jax.tree.map(one, batch)


def loss_denominators(layout) -> tuple[jax.Array, jax.Array]:
  """(CE weight sum, noisy latent token count) of the whole batch: the losses' denominators."""
  ce = jnp.maximum(jnp.sum(layout.ce_weights.astype(jnp.float32)), 1e-12)
  mse = jnp.maximum(jnp.sum(layout.vae_noisy > 0), 1).astype(jnp.float32)
  return ce, mse


def accumulate(grad_fn: Callable[..., tuple[dict, PyTree]], params: PyTree, micro: PyTree, keys: jax.Array
               ) -> tuple[dict, PyTree]:
  """Sums `grad_fn(params, micro[n], keys[n]) -> (scalars, grads)` over n with a `lax.scan`.

  Gradients are summed in float32 and returned in the params' dtypes; `scalars` (a dict of 0-d
  arrays) are summed too."""
  aux_shape, _ = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), keys[0])

  def body(carry, xs):
    g_acc, a_acc = carry
    aux, g = grad_fn(params, *xs)
    g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
    return (g_acc, jax.tree.map(jnp.add, a_acc, aux)), None

  init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape))
  (grads, aux), _ = jax.lax.scan(body, init, (micro, keys))
  return aux, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
