"""The pure train step on one device: flow inputs, update, EMA, frozen leaves, non-finite skips."""

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.model.bagel import shift_timesteps
from bagel_jax.train.step import StepConfig, TrainState, flow_batch, frozen_mask
from tests.train_fixtures import FAST_COMPILE, HP, ROWS, fresh_state, single_device_step, tiny_batch, tiny_model, tiny_params


def _step_rng(state: TrainState):
  return jax.random.split(jax.random.wrap_key_data(jnp.asarray(state.rng)))[1]


def test_flow_batch_timesteps_noise_latents():
  model, params = tiny_model(), tiny_params()
  batch = tiny_batch(model.cfg, 4, 0)
  rng = jax.random.key(3)
  fb = jax.jit(lambda hp, v, b, r: flow_batch(model, hp, v, b, r), static_argnums=0, compiler_options=FAST_COMPILE)
  mb = fb(StepConfig(), params["vae"], batch, rng)
  lay = batch.layout
  ids, noisy = np.asarray(lay.vae_image_ids), np.asarray(lay.vae_noisy)
  t = np.asarray(mb.timesteps)
  assert np.all(t[ids < 0] == 0) and np.all(t[(ids >= 0) & (noisy == 0)] == 0)
  tn = t[noisy > 0]
  assert tn.size and np.all((tn > 0) & (tn < 1))
  for b in range(t.shape[0]):  # one timestep per image
    for i in np.unique(ids[b][ids[b] >= 0]):
      assert np.ptp(t[b][ids[b] == i]) == 0
  assert mb.noise.shape == mb.vae_latents.shape == (4, lay.vae_indexes.shape[1], model.cfg.patch_latent_dim)
  # the clean latents are the layout's tokens of a posterior sample of the VAE images
  k_vae = jax.random.split(rng, 3)[0]
  imgs = batch.vae_images.reshape((-1,) + batch.vae_images.shape[2:])
  lat = jax.jit(model.encode_images, compiler_options=FAST_COMPILE)(params, imgs, k_vae)
  want = model.latent_tokens(lat.reshape(batch.vae_images.shape[:2] + lat.shape[1:]), lay)
  np.testing.assert_allclose(mb.vae_latents, want, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(mb.vae_latents)[ids < 0] == 0)
  # the shift maps the same draws: t' = s t / (1 + (s - 1) t)
  mb3 = fb(StepConfig(timestep_shift=3.0), params["vae"], batch, rng)
  np.testing.assert_allclose(mb3.timesteps, shift_timesteps(mb.timesteps, 3.0), rtol=1e-5)


def test_step_updates_params_ema_and_counters():
  model, params = tiny_model(), tiny_params()
  batch = tiny_batch(model.cfg, ROWS, 0)
  s0 = fresh_state()
  step = single_device_step()
  s1, m = step(fresh_state(), params["vae"], batch)
  assert int(m["skipped"]) == 0 and np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
  assert int(s1.step) == 1 and int(s1.nonfinite_streak) == 0 and int(s1.nonfinite_total) == 0
  assert not np.array_equal(s1.rng, s0.rng)
  # the step's loss is BagelModel.loss on the flow batch drawn from the state's rng
  mb = jax.jit(lambda v, b, r: flow_batch(model, HP, v, b, r), compiler_options=FAST_COMPILE)(
      params["vae"], batch, _step_rng(s0))
  total, parts = jax.jit(model.loss, compiler_options=FAST_COMPILE)(params, mb)
  np.testing.assert_allclose(float(m["loss"]), float(total), rtol=1e-5)
  np.testing.assert_allclose(float(m["ce"]), float(parts.ce), rtol=1e-5)
  assert int(m["num_ce"]) == int(parts.num_ce) and int(m["num_mse"]) == int(parts.num_mse) > 0
  # frozen sin-cos tables never move; everything else does; EMA = d * ema + (1 - d) * new
  frozen = frozen_mask(s0.params, HP.frozen)
  assert sum(jax.tree.leaves(frozen)) == 2
  for f, p0, p1, e1 in zip(jax.tree.leaves(frozen), jax.tree.leaves(s0.params), jax.tree.leaves(s1.params),
                           jax.tree.leaves(s1.ema)):
    if f:
      np.testing.assert_array_equal(p1, p0)
      np.testing.assert_array_equal(e1, p0)
    else:
      np.testing.assert_allclose(e1, 0.9 * p0 + 0.1 * np.asarray(p1), rtol=1e-6, atol=1e-7)
  moved = [not np.array_equal(a, b) for a, b, f in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params),
                                                        jax.tree.leaves(frozen)) if not f]
  assert all(moved)


def test_training_reduces_ce():
  model, params = tiny_model(), tiny_params()
  batch = tiny_batch(model.cfg, ROWS, 0)
  step = single_device_step()
  s = fresh_state()
  ces = []
  for _ in range(4):
    s, m = step(s, params["vae"], batch)
    ces.append(float(m["ce"]))
  assert ces[-1] < ces[0] - 0.3, ces


def test_nonfinite_step_is_skipped_and_counted():
  model, params = tiny_model(), tiny_params()
  good = tiny_batch(model.cfg, ROWS, 0)
  bad = good.replace(vit_patches=np.full_like(good.vit_patches, np.nan))
  step = single_device_step()
  s0 = fresh_state()
  s1, m1 = step(fresh_state(), params["vae"], bad)
  assert int(m1["skipped"]) == 1 and not np.isfinite(float(m1["loss"]))
  assert int(s1.step) == 1 and int(s1.nonfinite_streak) == 1 and int(s1.nonfinite_total) == 1
  for name in ("params", "opt_state", "ema"):
    for a, b in zip(jax.tree.leaves(getattr(s0, name)), jax.tree.leaves(getattr(s1, name))):
      np.testing.assert_array_equal(a, b)
  s2, _ = step(s1, params["vae"], bad)
  assert int(s2.nonfinite_streak) == 2 and int(s2.nonfinite_total) == 2
  s3, m3 = step(s2, params["vae"], good)
  assert int(m3["skipped"]) == 0 and int(s3.nonfinite_streak) == 0 and int(s3.nonfinite_total) == 2
  assert int(s3.step) == 3


def test_no_ema_state():
  from bagel_jax.train.step import init_train_state
  from tests.train_fixtures import tx
  s = init_train_state(tiny_params()["bagel"], tx(), jax.random.key(0), ema=False)
  assert s.ema is None and s.rng.dtype == jnp.uint32 and s.rng.shape == (2,)
  s2 = init_train_state(tiny_params()["bagel"], tx(), jax.random.key_data(jax.random.key(0)), ema=True)
  np.testing.assert_array_equal(s.rng, s2.rng)
