"""Gradient accumulation: N micro-batches of R rows == one batch of N x R rows (same draws).

The accumulated step runs sharded on 8 fake devices (data 2 x fsdp 2 x tensor 2); the reference is one value_and_grad over
the N micro-batches' flow inputs concatenated into one batch, on one device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bagel_jax import sharding as shd
from bagel_jax.train import accumulate
from bagel_jax.train import step as ts
from tests.train_fixtures import FAST_COMPILE, HP, tiny_batch, tiny_model, tiny_params

N = 2


def _reference(model, hp, params, vae, batch, step_rng):
  """Loss and gradients of one batch made of the N micro-batches' flow inputs."""
  micro = accumulate.split_micro(batch, N)
  keys = jax.random.split(step_rng, N)
  mbs = [ts.flow_batch(model, hp, vae, jax.tree.map(lambda x: x[n], micro), keys[n]) for n in range(N)]
  full = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *mbs)
  loss = lambda p: model.loss({"bagel": p, "vae": vae}, full)
  return jax.value_and_grad(loss, has_aux=True)(params)


def test_interleave_and_split_are_inverse():
  a = {"x": np.arange(6).reshape(3, 2)}
  b = {"x": 10 + np.arange(6).reshape(3, 2)}
  both = accumulate.interleave([a, b])
  assert both["x"][:, 0].tolist() == [0, 10, 2, 12, 4, 14]
  micro = accumulate.split_micro(jax.tree.map(jnp.asarray, both), 2)
  np.testing.assert_array_equal(micro["x"][0], a["x"])
  np.testing.assert_array_equal(micro["x"][1], b["x"])


def test_accumulated_step_equals_one_big_batch_on_eight_devices():
  model, params = tiny_model(), tiny_params()
  vae = params["vae"]
  hp = dataclasses.replace(HP, grad_accum_steps=N, ema_decay=None)
  tx = optax.sgd(1.0)  # params - new params = the applied gradient
  batch = tiny_batch(model.cfg, 8, 0)  # 2 micro-batches of 4 rows, 1 row per device and micro-batch
  state = ts.init_train_state(params["bagel"], tx, jax.random.key(1), ema=False)
  _, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
  (want_loss, want_parts), want_g = jax.jit(lambda p, b: _reference(model, hp, p, vae, b, step_rng),
                                            compiler_options=FAST_COMPILE)(state.params, batch)

  mesh = shd.make_mesh("data=2,fsdp=2,tensor=2")
  abstract = jax.eval_shape(lambda q: ts.init_train_state(q, tx, jax.random.key(1), False), params["bagel"])
  ss = shd.train_state_shardings(abstract, mesh)
  bs = shd.batch_shardings(batch, mesh)
  step = ts.jit_train_step(model, tx, hp, mesh, shd.DEFAULT_RULES, ss, bs, compiler_options=FAST_COMPILE)
  host = jax.tree.map(np.asarray, state)
  out, m = step(jax.device_put(host, ss), jax.device_put(vae, NamedSharding(mesh, P())), jax.device_put(batch, bs))

  np.testing.assert_allclose(float(m["loss"]), float(want_loss), rtol=2e-6)
  np.testing.assert_allclose(float(m["ce"]), float(want_parts.ce), rtol=2e-6)
  np.testing.assert_allclose(float(m["mse"]), float(want_parts.mse), rtol=2e-6)
  assert int(m["num_ce"]) == int(want_parts.num_ce) and int(m["num_mse"]) == int(want_parts.num_mse)
  applied = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), host.params, out.params)
  frozen = ts.frozen_mask(host.params, hp.frozen)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want_g))
  for (path, got), g, f in zip(jax.tree_util.tree_leaves_with_path(applied), jax.tree.leaves(want_g),
                               jax.tree.leaves(frozen)):
    want = np.zeros_like(got) if f else np.asarray(g, np.float64)
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, err_msg=shd.path_str(path))


def test_memory_is_one_micro_batch():
  """Temporaries of 4 micro-batches of 2 rows stay near those of one batch of 2 rows."""
  model, params = tiny_model(), tiny_params()
  tx = optax.sgd(1.0)
  state = jax.eval_shape(lambda p: ts.init_train_state(p, tx, jax.random.key(1), False), params["bagel"])
  vae = jax.eval_shape(lambda v: v, params["vae"])

  def temp(n):
    hp = dataclasses.replace(HP, grad_accum_steps=n, ema_decay=None)
    batch = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, tiny_batch(model.cfg, 2 * n, 0)))
    f = jax.jit(lambda s, v, b: ts.train_step(model, tx, hp, s, v, b), compiler_options=FAST_COMPILE)
    return f.lower(state, vae, batch).compile().memory_analysis().temp_size_in_bytes

  one, four = temp(1), temp(4)
  assert four < 1.5 * one, (one, four)


def test_plan_reports_accumulated_micro_batches():
  from bagel_jax.train.plan import RowMix, plan
  lines = []
  mix = RowMix(tokens=128, gen_images=1, gen_side=16, und_images=1, und_side=28, ce_tokens=16, caption=8)
  fig = plan(None, "fsdp=4,tensor=2", preset="bagel_tiny", mix=mix, flops=False, compiler_options=FAST_COMPILE,
             out=lines.append, grad_accum_steps=3)
  text = "\n".join(lines)
  assert "12 rows x 128 tokens" in text and "3 accumulated micro-batches of 4 rows" in text, text
  assert fig["activations_and_temps"] > 0
