"""The train step never applies a non-finite update, even when the loss and the gradient are finite."""

from __future__ import annotations

import jax
import numpy as np
import optax

from tests.train_fixtures import ROWS, fresh_state, single_device_step, tiny_batch, tiny_model, tiny_params


def test_non_finite_update_with_finite_loss_and_gradient_is_skipped():
  """An Adam first moment of inf (as a NaN/inf learning rate or an overflow would leave it) makes
  the update non-finite while the loss and gradient stay finite: the step must keep the old
  parameters, optimiser state and EMA, and count the step as skipped."""
  state = fresh_state()
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  poisoned_mu = jax.tree.map(lambda m: np.full_like(m, np.inf), adam.mu)
  opt_state = jax.tree.map(lambda x: x, state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
  opt_state = jax.tree.map(lambda s: s._replace(mu=poisoned_mu) if isinstance(s, optax.ScaleByAdamState) else s,
                           opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
  state = state.replace(opt_state=opt_state)
  before = jax.tree.map(np.array, state)
  new, m = single_device_step()(state, tiny_params()["vae"], tiny_batch(tiny_model().cfg, ROWS, 0))
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert int(m["skipped"]) == 1 and int(new.nonfinite_total) == 1 and int(new.nonfinite_streak) == 1
  for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(new.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  for a, b in zip(jax.tree.leaves(before.ema), jax.tree.leaves(new.ema)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new.params))
