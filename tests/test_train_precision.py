"""The 7B recipe's defaults on the tiny model: rematerialisation and bfloat16 compute.

- Every remat policy recomputes exactly what `remat="none"` keeps: the gradients of the same loss
  (same flow batch) agree to float32 rounding, and the policy really is in the traced program.
- A bfloat16-compute step with float32 master weights stays close to the float32 step (loss,
  gradient norm, update direction), and the parameters, optimiser state and EMA stay float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.api import BagelModel
from bagel_jax.model.qwen2_mot import REMAT_POLICIES
from bagel_jax.train.step import flow_batch, train_step
from tests.train_fixtures import FAST_COMPILE, HP, ROWS, fresh_state, single_device_step, tiny_batch, tiny_model, \
    tiny_params, tx


@functools.lru_cache(maxsize=None)
def _flow_batch():
  model, params = tiny_model(), tiny_params()
  fb = jax.jit(lambda v, b, r: flow_batch(model, HP, v, b, r), compiler_options=FAST_COMPILE)
  return jax.device_get(fb(params["vae"], tiny_batch(model.cfg, ROWS, 0), jax.random.key(5)))


@functools.lru_cache(maxsize=None)
def _grads(remat: str):
  model = BagelModel(tiny_model().cfg, attention_impl="reference", remat=remat)
  vae = tiny_params()["vae"]
  loss = lambda p, mb: model.loss({"bagel": p, "vae": vae}, mb)[0]
  traced = str(jax.make_jaxpr(loss)(tiny_params()["bagel"], _flow_batch()))
  return jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)(tiny_params()["bagel"], _flow_batch()), traced


@pytest.mark.parametrize("remat", sorted(set(REMAT_POLICIES) - {"none"}))
def test_remat_policies_give_the_same_gradients(remat):
  (loss0, g0), plain = _grads("none")
  (loss, g), traced = _grads(remat)
  assert "remat" in traced and "remat" not in plain  # the rematerialised scan body is in the program
  np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(g0)]
  # per leaf, relative to the leaf (floored at 1e-3 of the whole gradient: the key biases' gradients
  # are zero in exact arithmetic, softmax being shift-invariant, and only rounding noise here)
  floor = 1e-3 * np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(g0)))
  for path, a, b in zip(paths, jax.tree.leaves(g), jax.tree.leaves(g0)):
    err = np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), floor)
    assert err < 1e-5, (remat, path, err)


def test_bf16_compute_with_float32_master_weights():
  cfg = tiny_model().cfg
  bf16 = BagelModel(cfg, param_dtype=jnp.float32, dtype=jnp.bfloat16, attention_impl="reference")
  step16 = jax.jit(functools.partial(train_step, bf16, tx(), HP), compiler_options=FAST_COMPILE)
  vae, batch = tiny_params()["vae"], tiny_batch(cfg, ROWS, 0)
  s0 = fresh_state()
  s32, m32 = single_device_step()(fresh_state(), vae, batch)
  s16, m16 = step16(fresh_state(), vae, batch)
  for name in ("params", "opt_state", "ema"):
    dtypes = {str(x.dtype) for x in jax.tree.leaves(getattr(s16, name)) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {"float32"}, (name, dtypes)
  assert int(m16["skipped"]) == 0
  for k, tol in (("loss", 2e-2), ("ce", 2e-2), ("mse", 2e-2), ("grad_norm", 5e-2)):
    assert abs(float(m16[k]) / float(m32[k]) - 1) < tol, (k, float(m16[k]), float(m32[k]))
  # the update: AdamW's first step is about lr * sign(grad); bf16 noise flips only near-zero gradients
  d32 = np.concatenate([np.ravel(np.asarray(b) - np.asarray(a)) for a, b in zip(jax.tree.leaves(s0.params),
                                                                             jax.tree.leaves(s32.params))])
  d16 = np.concatenate([np.ravel(np.asarray(b) - np.asarray(a)) for a, b in zip(jax.tree.leaves(s0.params),
                                                                             jax.tree.leaves(s16.params))])
  cosine = float(d16 @ d32 / (np.linalg.norm(d16) * np.linalg.norm(d32)))
  assert cosine > 0.9, cosine
