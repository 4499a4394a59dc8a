"""The pure train step on one device: flow inputs, update, EMA, frozen leaves, non-finite skips."""

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import layout as L
from bagel_jax.model.bagel import shift_timesteps
from bagel_jax.train.step import StepConfig, TrainBatch, TrainState, flow_batch, frozen_mask, timesteps_from_raw
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
  # the clean latents are the layout's tokens of a posterior sample of the VAE images: scale * (mean +
  # std * eps - shift) with eps ~ N(0, I), recovered here from the VAE's moments (whatever key drew it)
  imgs = batch.vae_images.reshape((-1,) + batch.vae_images.shape[2:])
  moments = jax.jit(model.encode_moments, compiler_options=FAST_COMPILE)(params, imgs)
  mean, logvar = np.split(np.asarray(moments, np.float64), 2, axis=-1)
  scale, shift = model.cfg.vae.scale_factor, model.cfg.vae.shift_factor
  tokens = lambda x: np.asarray(model.latent_tokens(x.reshape(batch.vae_images.shape[:2] + x.shape[1:]), lay))
  valid = ids >= 0
  eps = (np.asarray(mb.vae_latents) - tokens(scale * (mean - shift)))[valid] / tokens(scale * np.exp(0.5 * logvar))[valid]
  assert eps.size > 2000 and abs(eps.mean()) < 0.1 and 0.9 < eps.std() < 1.1, (eps.mean(), eps.std())
  assert np.all(np.asarray(mb.vae_latents)[~valid] == 0)
  assert not np.array_equal(fb(StepConfig(), params["vae"], batch, jax.random.key(4)).vae_latents, mb.vae_latents)
  # the shift maps the same draws: t' = s t / (1 + (s - 1) t)
  mb3 = fb(StepConfig(timestep_shift=3.0), params["vae"], batch, rng)
  np.testing.assert_allclose(mb3.timesteps, shift_timesteps(mb.timesteps, 3.0), rtol=1e-5)


def test_timesteps_from_upstreams_raw_draws(cases):
  """Upstream's raw draws (fixture train/raw_timesteps, -inf for clean images) through our transform
  give upstream's train/timesteps."""
  raw = cases["train/raw_timesteps"]
  got = timesteps_from_raw(jnp.asarray(raw), jnp.isfinite(raw), 1.0)
  np.testing.assert_allclose(got, cases["train/timesteps"], rtol=1e-6, atol=0)
  assert np.any(raw == -np.inf) and np.any(np.isfinite(raw))


def _images_batch(cfg, rows: int, per_row: int):
  """`rows` rows of one sample each holding `per_row` one-token VAE images, every other one clean."""
  plan = [L.Text([5, 6])] + [L.VaeImage((1, 1), loss=i % 2 == 0) for i in range(per_row)]
  n = 4 + 3 * per_row
  cap = L.Capacity(tokens=n, vit=1, vae=per_row, ce=4, vae_images=per_row, und=n, gen=per_row)
  lay = L.pack([[plan]] * rows, cap, cfg.tokens, **L.position_args(cfg))
  px = cfg.latent_downsample
  images = np.random.default_rng(0).uniform(-1, 1, (rows, per_row, px, px, 3)).astype(np.float32)
  return TrainBatch(layout=lay, vit_patches=np.zeros((rows, 1, cfg.vit.patch_dim), np.float32), vae_images=images)


def test_training_timesteps_are_logit_normal():
  """flow_batch's timesteps: logit(t) ~ N(0, 1) for generation targets (upstream: sigmoid of a
  normal draw), t = 0 for clean images. Kolmogorov-Smirnov over 1920 draws (fixed keys) at
  p > 1e-3, plus the first two moments within 4 standard errors; a uniform draw (t ~ U(0, 1):
  logit(t) logistic, std 1.8; or sigmoid(U(0, 1))) fails both by far."""
  from scipy import stats
  model, params = tiny_model(), tiny_params()
  batch = _images_batch(model.cfg, rows=8, per_row=12)
  fb = jax.jit(lambda v, b, r: flow_batch(model, StepConfig(), v, b, r).timesteps, compiler_options=FAST_COMPILE)
  lay = batch.layout
  ids, noisy = np.asarray(lay.vae_image_ids), np.asarray(lay.vae_noisy) > 0
  draws = []
  for seed in range(40):
    t = np.asarray(fb(params["vae"], batch, jax.random.key(seed)))
    assert np.all(t[(ids >= 0) & ~noisy] == 0)
    draws.append(t[noisy])
  t = np.concatenate(draws).astype(np.float64)
  assert t.size == 40 * 8 * 6 and np.all((t > 0) & (t < 1))
  x = np.log(t / (1 - t))
  assert stats.kstest(x, "norm").pvalue > 1e-3, stats.kstest(x, "norm")
  se = 1 / np.sqrt(x.size)
  assert abs(x.mean()) < 4 * se and abs(x.std() - 1) < 4 * se * np.sqrt(0.5), (x.mean(), x.std())


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
