"""The FLUX autoencoder against upstream (fixture `vae/`, `train/padded_latent`) and its weight rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file

from bagel_jax.weights import table as weights
from bagel_jax.config import BagelConfig, VAEConfig, load_config
from bagel_jax.model.autoencoder import AutoEncoder, latent_mean, sample_latents
from tests.conftest import FIXTURE_DIR, rel_err

TOL = 1e-4


def nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))


def nchw(x) -> np.ndarray:
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


def _leaf_paths(tree: dict, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaf_paths(v, prefix + (k,))
    else:
      yield prefix + (k,)


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _check_rules(cfg: BagelConfig, upstream_shapes: dict[str, tuple[int, ...]]):
  """Every upstream key -> exactly one parameter of matching shape; every parameter is covered."""
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: AutoEncoder(cfg.vae, rngs=nnx.Rngs(0)))))
  table = list(weights._vae_rules(cfg))
  assert all(r.file == "ae" and r.path[0] == "vae" and r.index == () for r in table)
  keys = [r.upstream for r in table]
  assert len(keys) == len(set(keys)), "duplicate upstream key"
  assert set(keys) == set(upstream_shapes), (sorted(set(keys) ^ set(upstream_shapes))[:5])
  paths = [r.path[1:] for r in table]
  assert len(paths) == len(set(paths)), "two keys map to one parameter"
  assert set(paths) == set(_leaf_paths(abstract)), "parameters left unmapped"
  for r in table:
    ours = tuple(_get(abstract, r.path[1:]).shape)
    assert weights.upstream_shape(r.kind, ours) == tuple(upstream_shapes[r.upstream]), r.upstream
  return abstract


@pytest.fixture(scope="module")
def cfg() -> BagelConfig:
  return load_config(FIXTURE_DIR)


@pytest.fixture(scope="module")
def ae(cfg) -> AutoEncoder:
  """The fixture's AE: built abstractly (no random init), then every parameter from ae.safetensors."""
  gdef, state = nnx.split(nnx.eval_shape(lambda: AutoEncoder(cfg.vae, rngs=nnx.Rngs(0))))
  sd = load_file(str(FIXTURE_DIR / "ae.safetensors"))
  pure: dict = {}
  for r in weights._vae_rules(cfg):
    weights._set(pure, r.path[1:], jnp.asarray(weights.to_ours(r.kind, sd[r.upstream])))
  nnx.replace_by_pure_dict(state, pure)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state)), "parameter left unloaded"
  return nnx.merge(gdef, state)


@pytest.fixture(scope="module")
def fns(ae):
  """Jitted pure functions of (state, inputs)."""
  gdef, state = nnx.split(ae)

  def pure(fn):
    jitted = jax.jit(lambda st, *a: fn(nnx.merge(gdef, st), *a))
    return lambda *a: jitted(state, *a)

  return {"encode": pure(AutoEncoder.encode), "moments": pure(AutoEncoder.encode_moments),
          "decode": pure(AutoEncoder.decode), "sample": pure(sample_latents), "mean": pure(latent_mean)}


def test_fixture_rules_match_ae_safetensors(cfg):
  with safe_open(str(FIXTURE_DIR / "ae.safetensors"), framework="numpy") as f:
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  _check_rules(cfg, shapes)


def test_moments(fns, cases):
  ours = fns["moments"](jnp.asarray(nhwc(cases["vae/image"])))
  assert ours.shape == (1, 8, 12, 32)
  assert rel_err(nchw(ours), cases["vae/moments"]) < TOL


def test_encode_with_eps(fns, cases):
  ours = fns["encode"](jnp.asarray(nhwc(cases["vae/image"])), jnp.asarray(nhwc(cases["vae/eps"])))
  assert rel_err(nchw(ours), cases["vae/encoded"]) < TOL


def test_decode(fns, cases):
  ours = fns["decode"](jnp.asarray(nhwc(cases["vae/latent_in"])))
  assert ours.shape == (1, 24, 32, 3)
  assert rel_err(nchw(ours), cases["vae/decoded"]) < TOL


def test_train_padded_latent(fns, cases):
  ours = fns["encode"](jnp.asarray(nhwc(cases["train/vae_padded_images"])), jnp.asarray(nhwc(cases["train/vae_eps"])))
  assert rel_err(nchw(ours), cases["train/padded_latent"]) < TOL


def test_sample_and_mean(ae, fns, cases):
  x = jnp.asarray(nhwc(cases["vae/image"]))
  moments = np.asarray(fns["moments"](x))
  cfg = ae.cfg
  mean_ref = cfg.scale_factor * (moments[..., :cfg.z_channels] - cfg.shift_factor)
  np.testing.assert_allclose(np.asarray(fns["mean"](x)), mean_ref, rtol=1e-5, atol=1e-5)
  rng = jax.random.key(3)
  eps = jax.random.normal(rng, mean_ref.shape, jnp.float32)
  np.testing.assert_allclose(np.asarray(fns["sample"](x, rng)), np.asarray(fns["encode"](x, eps)),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="eps shape"):
    ae.encode(x, eps[:, :2])


def _release_ae_shapes(vae: VAEConfig) -> dict[str, tuple[int, ...]]:
  """The release ae.safetensors header, written out from the dossier (section 6.4)."""
  s: dict[str, tuple[int, ...]] = {}

  def conv(k, o, i, kk=3):
    s[f"{k}.weight"], s[f"{k}.bias"] = (o, i, kk, kk), (o,)

  def norm(k, c):
    s[f"{k}.weight"], s[f"{k}.bias"] = (c,), (c,)

  def res(k, i, o):
    norm(f"{k}.norm1", i), conv(f"{k}.conv1", o, i), norm(f"{k}.norm2", o), conv(f"{k}.conv2", o, o)
    if i != o:
      conv(f"{k}.nin_shortcut", o, i, 1)

  def mid(k, c):
    res(f"{k}.block_1", c, c), res(f"{k}.block_2", c, c), norm(f"{k}.attn_1.norm", c)
    for n in ("q", "k", "v", "proj_out"):
      conv(f"{k}.attn_1.{n}", c, c, 1)

  conv("encoder.conv_in", 128, 3)
  for i, (a, b) in enumerate([(128, 128), (128, 256), (256, 512), (512, 512)]):
    res(f"encoder.down.{i}.block.0", a, b), res(f"encoder.down.{i}.block.1", b, b)
    if i < 3:
      conv(f"encoder.down.{i}.downsample.conv", b, b)
  mid("encoder.mid", 512), norm("encoder.norm_out", 512), conv("encoder.conv_out", 32, 512)
  conv("decoder.conv_in", 512, 16), mid("decoder.mid", 512)
  for i, (a, b) in enumerate([(256, 128), (512, 256), (512, 512), (512, 512)]):
    for j in range(3):
      res(f"decoder.up.{i}.block.{j}", a if j == 0 else b, b)
    if i > 0:
      conv(f"decoder.up.{i}.upsample.conv", b, b)
  norm("decoder.norm_out", 128), conv("decoder.conv_out", 3, 128)
  return s


def test_release_shapes_and_rules():
  cfg = BagelConfig()
  shapes = _release_ae_shapes(cfg.vae)
  assert len(shapes) == 244
  assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
  assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
  abstract = _check_rules(cfg, shapes)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == 83_819_683


def test_bad_inputs(ae):
  with pytest.raises(ValueError, match="images"):
    ae.encode_moments(jnp.zeros((1, 16, 16, 4)))
  with pytest.raises(ValueError, match="latents"):
    ae.decode(jnp.zeros((1, 4, 4, 8)))
  with pytest.raises(ValueError, match="downsample"):
    AutoEncoder(VAEConfig(downsample=16), rngs=nnx.Rngs(0))
