"""Mesh, logical rules and the sharded train step on 8 fake CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bagel_jax import sharding as shd
from bagel_jax.api import BagelModel
from bagel_jax.config import bagel_7b_mot
from bagel_jax.train.step import init_train_state, jit_init_train_state, jit_train_step
from tests.train_fixtures import (FAST_COMPILE, HP, ROWS, reference_run, tiny_batch, tiny_model, tiny_params,
                                  tiny_tx, tx)

# Sharded vs single-device, float32: loss, CE, MSE and gradient norm agree to 1e-5 relative;
# every updated parameter to 1e-4 absolute, i.e. 10% of one step's largest per-element change
# (AdamW's first steps move each element by about lr = 1e-3 whatever the gradient's size, so
# the reduction-order noise of near-zero gradients shows up amplified; a sharding bug moves
# elements by O(lr) and the gradient norm by far more than 1e-5).
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-4


def test_parse_and_make_mesh():
  assert shd.parse_mesh("fsdp=4,tensor=2") == {"data": 1, "fsdp": 4, "tensor": 2}
  assert shd.parse_mesh(None) == {"data": 1, "fsdp": -1, "tensor": 1}
  mesh = shd.make_mesh("data=2,fsdp=-1")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(shd.ShardingError):
    shd.make_mesh("fsdp=3")
  with pytest.raises(shd.ShardingError):
    shd.parse_mesh("model=2")


# Every parameter of the 7B model on fsdp=4 x tensor=2, written out (not derived from the rules):
# column-parallel kernels [in, out] -> (fsdp, tensor), row-parallel (o_proj, down_proj, fc2 and the
# second connector / time-embedder layers) -> (tensor, fsdp), their biases on tensor / replicated,
# norms replicated, the vocabulary on tensor, position tables (rows, width) on fsdp; stacked layer
# and expert axes unsplit; the frozen VAE replicated.
_L, _V = (None, None), (None,)  # [layer, expert] of the LLM, [layer] of the ViT
SPECS_7B = {
    "llm/embed_tokens": ("tensor", "fsdp"), "llm/lm_head": ("fsdp", "tensor"), "llm/norm": (),
    "llm/layers/q_proj/kernel": _L + ("fsdp", "tensor"), "llm/layers/k_proj/kernel": _L + ("fsdp", "tensor"),
    "llm/layers/v_proj/kernel": _L + ("fsdp", "tensor"), "llm/layers/o_proj/kernel": _L + ("tensor", "fsdp"),
    "llm/layers/q_proj/bias": _L + ("tensor",), "llm/layers/k_proj/bias": _L + ("tensor",),
    "llm/layers/v_proj/bias": _L + ("tensor",), "llm/layers/q_norm": (), "llm/layers/k_norm": (),
    "llm/layers/gate_proj/kernel": _L + ("fsdp", "tensor"), "llm/layers/up_proj/kernel": _L + ("fsdp", "tensor"),
    "llm/layers/down_proj/kernel": _L + ("tensor", "fsdp"),
    "llm/layers/input_layernorm": (), "llm/layers/post_attention_layernorm": (),
    "vit/patch_embedding/kernel": (None, "fsdp"), "vit/patch_embedding/bias": (),
    "vit/position_embedding": (None, "fsdp"), "vit/post_layernorm/scale": (), "vit/post_layernorm/bias": (),
    "vit/layers/q_proj/kernel": _V + ("fsdp", "tensor"), "vit/layers/k_proj/kernel": _V + ("fsdp", "tensor"),
    "vit/layers/v_proj/kernel": _V + ("fsdp", "tensor"), "vit/layers/out_proj/kernel": _V + ("tensor", "fsdp"),
    "vit/layers/q_proj/bias": _V + ("tensor",), "vit/layers/k_proj/bias": _V + ("tensor",),
    "vit/layers/v_proj/bias": _V + ("tensor",), "vit/layers/out_proj/bias": (),
    "vit/layers/fc1/kernel": _V + ("fsdp", "tensor"), "vit/layers/fc1/bias": _V + ("tensor",),
    "vit/layers/fc2/kernel": _V + ("tensor", "fsdp"), "vit/layers/fc2/bias": (),
    "vit/layers/layer_norm1/scale": (), "vit/layers/layer_norm1/bias": (),
    "vit/layers/layer_norm2/scale": (), "vit/layers/layer_norm2/bias": (),
    "connector/fc1/kernel": ("fsdp", "tensor"), "connector/fc1/bias": ("tensor",),
    "connector/fc2/kernel": ("tensor", "fsdp"), "connector/fc2/bias": (),
    "time_embedder/mlp_in/kernel": (None, "tensor"), "time_embedder/mlp_in/bias": ("tensor",),
    "time_embedder/mlp_out/kernel": ("tensor", "fsdp"), "time_embedder/mlp_out/bias": (),
    "vae2llm/kernel": (None, "fsdp"), "vae2llm/bias": (), "llm2vae/kernel": ("fsdp",), "llm2vae/bias": (),
    "latent_pos_embed": (None, "fsdp"), "vit_pos_embed": (None, "fsdp"),
}


def test_every_7b_parameter_follows_the_rules():
  params = BagelModel(bagel_7b_mot()).abstract_params()
  mesh = shd.make_mesh("fsdp=4,tensor=2")
  specs = shd.param_specs(params, mesh)
  flat = {shd.path_str(p): (x, s) for (p, x), s in zip(jax.tree_util.tree_leaves_with_path(params),
                                                      jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)))}
  bagel = {k[len("bagel/"):]: v for k, v in flat.items() if k.startswith("bagel/")}
  assert sorted(bagel) == sorted(SPECS_7B)  # a new parameter needs its expected spec here
  for k, (x, spec) in bagel.items():
    assert spec == P(*SPECS_7B[k]), (k, spec, SPECS_7B[k])
  assert all(spec == P() for k, (_, spec) in flat.items() if k.startswith("vae/"))
  # every sharded dimension divisible by its mesh axes, and ~1/8 of the 14.6B parameters per device
  sharded_bytes = 0
  for k, (x, spec) in bagel.items():
    for dim, d in zip(x.shape, spec):
      if d is not None:
        assert dim % np.prod([mesh.shape[a] for a in ((d,) if isinstance(d, str) else d)]) == 0
    sharded_bytes += np.prod(NamedSharding(mesh, spec).shard_shape(x.shape))
    if np.prod(x.shape) >= 1 << 20:  # every large tensor is split at least over fsdp
      assert np.prod(NamedSharding(mesh, spec).shard_shape(x.shape)) * 4 <= np.prod(x.shape), k
  total = sum(np.prod(x.shape) for x, _ in bagel.values())
  assert sharded_bytes < total / 7.9


def test_unknown_parameter_is_an_error():
  with pytest.raises(shd.ShardingError, match="PARAM_AXES"):
    shd.param_logical_axes("bagel/new_head/kernel", 2)
  with pytest.raises(shd.ShardingError, match="names 4 axes"):
    shd.param_logical_axes("llm/layers/q_proj/kernel", 3)


def test_optimizer_state_mirrors_parameters():
  from ml_collections import ConfigDict

  from bagel_jax.train.optim import make_optimizer
  mesh = shd.make_mesh("fsdp=4,tensor=2")
  p = tiny_params()["bagel"]
  ocfg = ConfigDict(dict(lr=1e-4, warmup_steps=0, schedule="constant", min_lr=0.0, b1=0.9, b2=0.95, eps=1e-15,
                         weight_decay=0.0, clip=1.0, freeze_vit=True))
  for t in (tiny_tx(), make_optimizer(ocfg, p, 10)[0]):
    state = jax.eval_shape(lambda q: init_train_state(q, t, jax.random.key(0), True), p)
    ss = shd.train_state_shardings(state, mesh)
    want = {shd.path_str(k): s.spec for k, s in jax.tree_util.tree_leaves_with_path(ss.params)}
    n_mirrored = 0
    for k, s in jax.tree_util.tree_leaves_with_path(ss.opt_state):
      path = shd.path_str(k)
      hits = [w for w in want if path.endswith(w)]
      if hits:
        assert s.spec == want[max(hits, key=len)], path
        n_mirrored += 1
      else:
        assert s.spec == P(), path
    assert n_mirrored >= len(want)  # mu and nu of each trainable leaf
    assert ss.step.spec == P() and ss.rng.spec == P()


@pytest.mark.parametrize("mesh_spec", ["fsdp=4,tensor=2", "data=2,fsdp=4"])
def test_sharded_step_matches_single_device(mesh_spec):
  model, params = tiny_model(), tiny_params()
  ref_state, ref_metrics = reference_run(1)
  mesh = shd.make_mesh(mesh_spec)
  batch = tiny_batch(model.cfg, ROWS, 0)
  abstract = jax.eval_shape(lambda q: init_train_state(q, tx(), jax.random.key(1), True), params["bagel"])
  ss = shd.train_state_shardings(abstract, mesh)
  bs = shd.batch_shardings(batch, mesh)
  init = jit_init_train_state(tx(), mesh, ss, ema=True, compiler_options=FAST_COMPILE)
  state = init(jax.device_put(params["bagel"], ss.params), jax.random.key(1))
  step = jit_train_step(model, tx(), HP, mesh, shd.DEFAULT_RULES, ss, bs, compiler_options=FAST_COMPILE)
  out, m = step(state, jax.device_put(params["vae"], NamedSharding(mesh, P())), jax.device_put(batch, bs))
  assert state.params["llm"]["lm_head"].is_deleted()  # the state was donated
  for k in ("loss", "ce", "mse", "grad_norm"):
    np.testing.assert_allclose(float(m[k]), float(ref_metrics[0][k]), rtol=LOSS_RTOL, err_msg=k)
  for k in ("num_ce", "num_mse", "skipped"):
    assert int(m[k]) == int(ref_metrics[0][k])
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_state.params))
  worst = 0.0
  for (path, x), want in zip(jax.tree_util.tree_leaves_with_path(out.params), jax.tree.leaves(ss.params)):
    assert x.sharding == want, (shd.path_str(path), x.sharding, want)  # the state keeps its placement
    worst = max(worst, float(np.max(np.abs(np.asarray(x) - flat_ref[path]))))
  assert worst < PARAM_ATOL, worst
  # EMA = d * ema + (1 - d) * new params (d = 0.9, ema = the initial params) at float32 precision: a
  # decay off by 0.01 moves it by 1e-5, 100 times this tolerance
  d = HP.ema_decay
  for e, p0, p1 in zip(jax.tree.leaves(out.ema), jax.tree.leaves(params["bagel"]), jax.tree.leaves(out.params)):
    np.testing.assert_allclose(e, d * np.asarray(p0, np.float64) + (1 - d) * np.asarray(p1, np.float64),
                               rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(out.rng, ref_state.rng)
  assert int(out.step) == 1
  # a large kernel really is split: fsdp on the input dim (and tensor on the output dim)
  q = out.params["llm"]["layers"]["q_proj"]["kernel"]
  assert q.addressable_shards[0].data.shape[2] == q.shape[2] // mesh.shape["fsdp"]


def test_host_local_to_global_single_process():
  mesh = shd.make_mesh("data=2,fsdp=4")
  batch = tiny_batch(tiny_model().cfg, ROWS, 0)
  bs = shd.batch_shardings(batch, mesh)
  rows = shd.process_rows(ROWS)
  assert rows == slice(0, ROWS)
  g = shd.host_local_to_global(jax.tree.map(lambda x: np.asarray(x)[rows], batch), bs)
  np.testing.assert_array_equal(g.layout.k_end, batch.layout.k_end)
  assert g.vae_images.sharding.spec == P(("data", "fsdp"))
  with pytest.raises(shd.ShardingError):
    shd.batch_shardings(tiny_batch(tiny_model().cfg, 3, 0), mesh)


def test_constrain_is_a_noop_without_rules():
  x = np.ones((8, 4), np.float32)
  assert shd.constrain(x, ("activation_batch", None)) is x
  mesh = shd.make_mesh("fsdp=8")

  @jax.jit
  def f(x):
    with shd.use_rules(mesh):
      return shd.constrain(x * 2, ("activation_batch", "activation_embed"))

  assert f(x).sharding.spec == P("fsdp")


def test_flash_xla_stand_in_matches_reference():
  """The plan's attention stand-in is exact (forward and gradients), with a padded last chunk."""
  import jax.numpy as jnp

  from bagel_jax.attention.reference import reference_attention
  from bagel_jax.attention.flash_xla import attention as flash_xla_attention
  lay = tiny_batch(tiny_model().cfg, 2, 0).layout
  b, t = lay.k_start.shape
  r = np.random.default_rng(0)
  q, k, v = (jnp.asarray(r.normal(size=(b, t, h, 16)), jnp.float32) for h in (4, 2, 2))
  ints = (lay.k_start, lay.k_end, lay.q_start, lay.q_end)

  def loss(fn, q, k, v):
    o = fn(q, k, v, *ints, scale=0.25)
    return jnp.sum(o * jnp.cos(o))

  flash = lambda *a, **kw: flash_xla_attention(*a, chunk=40, **kw)
  got = jax.jit(jax.value_and_grad(lambda *x: loss(flash, *x), argnums=(0, 1, 2)))(q, k, v)
  want = jax.value_and_grad(lambda *x: loss(reference_attention, *x), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, c in zip(got[1], want[1]):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * float(np.abs(c).max()))


def test_plan_tiny_reports_memory():
  from bagel_jax import layout as L
  from bagel_jax.train.plan import RowMix, model_flops, plan, visible_pairs
  lay = tiny_batch(tiny_model().cfg, 1, 0).layout
  assert visible_pairs(lay, block=7) == int(L.dense_mask_np(lay).sum())
  assert model_flops(tiny_model().cfg, lay, 2)["model_flops"] == 2 * model_flops(tiny_model().cfg, lay, 1)["model_flops"]
  lines = []
  mix = RowMix(tokens=128, gen_images=1, gen_side=16, und_images=1, und_side=28, ce_tokens=16, caption=8)
  # one compile (the FLOPs path compiles 0- and 1-layer models too; the README run exercises it)
  fig = plan(None, "fsdp=4,tensor=2", preset="bagel_tiny", mix=mix, flops=False, compiler_options=FAST_COMPILE,
             out=lines.append)
  text = "\n".join(lines)
  assert "compiled at full depth (2 layers)" in text and "fits in 80 GB:  yes" in text, text
  assert fig["params"] > 0 and fig["optimizer"] >= 2 * fig["params"] * 0.9 and fig["activations_and_temps"] > 0
  assert fig["total"] == fig["arguments"] + fig["outputs"] - fig["aliased"] + fig["activations_and_temps"]


def test_train_step_constrains_the_residual_stream():
  """The LLM residual stream is constrained to the batch sharding at each layer boundary."""
  model, params = tiny_model(), tiny_params()
  mesh = shd.make_mesh("data=2,fsdp=4")
  batch = tiny_batch(model.cfg, ROWS, 0)
  abstract = jax.eval_shape(lambda q: init_train_state(q, tx(), jax.random.key(1), True), params["bagel"])
  ss = shd.train_state_shardings(abstract, mesh)
  step = jit_train_step(model, tx(), HP, mesh, shd.DEFAULT_RULES, ss, shd.batch_shardings(batch, mesh))
  text = step.lower(shd.abstract_with_shardings(abstract, ss), params["vae"], batch).as_text()
  hidden = model.cfg.llm.hidden_size
  constrained = [ln for ln in text.splitlines() if "sharding_constraint" in ln or "Sharding" in ln and "custom_call" in ln]
  llm = [ln for ln in constrained if f"x{hidden}x" in ln and '{"data", "fsdp"}' in ln.replace("'", '"')]
  assert len(llm) >= 2, "\n".join(constrained[:20])


def test_rules_are_config_data():
  rules = shd.rules_with({"mlp": "", "embed": "fsdp,tensor"})
  assert dict(rules)["mlp"] is None and dict(rules)["embed"] == ("fsdp", "tensor")
  assert dict(rules)["heads"] == "tensor"  # the rest as DEFAULT_RULES
  mesh = shd.make_mesh("fsdp=4,tensor=2")
  params = BagelModel(bagel_7b_mot()).abstract_params()
  specs = shd.param_specs(params, mesh, rules)
  assert specs["bagel"]["llm"]["layers"]["gate_proj"]["kernel"] == P(None, None, ("fsdp", "tensor"))
  with pytest.raises(shd.ShardingError, match="unknown logical axis 'mlps'"):
    shd.rules_with({"mlps": "tensor"})
  with pytest.raises(shd.ShardingError, match="'model' is not a mesh axis"):
    shd.rules_with({"mlp": "model"})
