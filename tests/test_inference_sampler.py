"""The compiled sampler: one compilation per size bucket, CFG rules, batching."""

import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.api import BagelModel
from bagel_jax.config import load_config
from bagel_jax.inference import FlowSettings, Inferencer, load_tokenizer
from bagel_jax.inference import flow
from tests.conftest import FIXTURE_DIR, rel_err

TOKENIZER = FIXTURE_DIR.parent / "tokenizer" / "tokenizer.json"
T2I = dict(num_timesteps=4, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0),
           cfg_renorm_type="global", output="array")


@pytest.fixture(scope="module")
def inf():
  cfg = load_config(FIXTURE_DIR)
  model = BagelModel(cfg, attention_impl="reference")
  return Inferencer(model, model.load_upstream(FIXTURE_DIR), load_tokenizer(TOKENIZER))


def test_two_prompts_same_size_compile_the_sampler_once(inf):
  kw = dict(T2I, image_shapes=(24, 24))  # a size no other test uses: a fresh compilation
  before = flow.TRACE_COUNT["denoise"]
  a = inf.batch([["a red cat"]], seed=0, **kw)
  assert flow.TRACE_COUNT["denoise"] == before + 1
  b = inf.batch([["two people walking along a beach at night"]], seed=1, **kw)
  assert flow.TRACE_COUNT["denoise"] == before + 1  # different prompt length and seed: no recompilation
  assert a[0][0].shape == b[0][0].shape == (24, 24, 3)
  assert not np.array_equal(a[0][0], b[0][0])


def test_batch_matches_single_requests(inf):
  noise = [np.random.default_rng(i).standard_normal((9, 64)).astype(np.float32) for i in range(2)]
  prompts = ["a cozy kitchen with green plants", "stars"]
  both = inf.batch([[p] for p in prompts], image_shapes=(24, 24), init_noise=noise, record=True, **T2I)
  lat_both = inf.last["groups"][0]["final_latent"]
  for i, p in enumerate(prompts):
    inf.batch([[p]], image_shapes=(24, 24), init_noise=[noise[i]], record=True, **T2I)
    assert rel_err(lat_both[i], inf.last["groups"][0]["final_latent"][0]) < 1e-5
    assert np.abs(both[i][0].astype(int) - inf.last["groups"][0]["image_u8"][0]).max() <= 1


def test_cfg_interval_is_strict_below_and_image_only_cfg_is_ignored():
  s = FlowSettings(num_timesteps=7, timestep_shift=3.0, cfg_interval=(0.375, 1.0))
  ts, dts, on = flow.schedule(s)
  assert np.float32(0.375) in ts and not on[list(ts).index(np.float32(0.375))]  # lo < t, not lo <= t
  assert on[0]  # t = 1.0 <= hi
  assert np.allclose(dts.sum(), 1.0)
  assert FlowSettings(cfg_text_scale=1.0, cfg_img_scale=2.0).num_contexts == 1
  assert FlowSettings(cfg_text_scale=4.0, cfg_img_scale=1.0).num_contexts == 2
  assert FlowSettings(cfg_text_scale=4.0, cfg_img_scale=1.5).num_contexts == 3


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_combine_cfg_formulas(renorm):
  rng = np.random.default_rng(0)
  v, u_t, u_i = (rng.standard_normal((1, 5, 8)).astype(np.float32) for _ in range(3))
  st, si, lo = 4.0, 2.0, 0.0
  got = np.asarray(flow.combine_cfg(*(jnp.asarray(a) for a in (v, u_t, u_i)), st, si, renorm, lo))
  n = lambda x, ax: np.linalg.norm(x, axis=ax, keepdims=True)
  if renorm == "text_channel":
    vt = u_t + st * (v - u_t)
    vt = vt * np.clip(n(v, -1) / (n(vt, -1) + 1e-8), lo, 1)
    ref = u_i + si * (vt - u_i)
  else:
    g = u_i + si * (u_t + st * (v - u_t) - u_i)
    ax = (1, 2) if renorm == "global" else -1
    ref = g * np.clip(n(v, ax) / (n(g, ax) + 1e-8), lo, 1)
  assert rel_err(got, ref) < 1e-6


def test_sharded_sampler_matches_single_device(inf):
  """Inferencer(mesh=...) places the weights by the rules and runs jit_denoise: same images as one device."""
  from bagel_jax import sharding as shd
  mesh = shd.make_mesh("fsdp=4,tensor=2")
  sharded = Inferencer(inf.model, inf.params, inf.tokenizer, mesh=mesh)
  q = sharded.params["bagel"]["llm"]["layers"]["q_proj"]["kernel"]
  assert q.sharding.spec == shd.param_specs(inf.params, mesh)["bagel"]["llm"]["layers"]["q_proj"]["kernel"]
  assert len({s.device for s in q.addressable_shards}) == 8
  noise = [np.random.default_rng(7).standard_normal((9, 64)).astype(np.float32)]
  want = inf.batch([["a cozy kitchen"]], image_shapes=(24, 24), init_noise=noise, **T2I)[0][0]
  got = sharded.batch([["a cozy kitchen"]], image_shapes=(24, 24), init_noise=noise, **T2I)[0][0]
  assert np.abs(want.astype(int) - got.astype(int)).max() <= 1
  assert want.std() > 0 and len(sharded._samplers) == 1  # the image came from jit_denoise
  with pytest.raises(flow.InferenceError, match="record=True"):
    sharded.batch([["x"]], image_shapes=(24, 24), init_noise=noise, record=True, **T2I)
