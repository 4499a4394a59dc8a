"""Pre-training init from Hugging Face checkpoints vs upstream's main() (fixture hf_init_tiny_a, float32).

The fixture was recorded by running upstream's own `train/pretrain_unified_navit.py:main()` on
tiny Qwen2 / SigLIP / FLUX checkpoints (see tests/fixtures/hf_init_tiny_a/CASES.md).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax import layout as L
from bagel_jax.api import BagelModel
from bagel_jax.model.bagel import Batch
from bagel_jax.weights.hf_init import HFInit, HFInitArgs
from bagel_jax.weights.place import place_params
from bagel_jax.weights.safetensors_io import read_safetensors
from tests.conftest import rel_err

FIX = pathlib.Path(__file__).parent / "fixtures" / "hf_init_tiny_a"
TOL = 1e-4  # CASES.md: max(1e-4, 10 x the largest float32 noise floor)
RANDOM_MODULES = ("connector.", "vae2llm.", "time_embedder.")


def fixture_args(**kw) -> HFInitArgs:
  base = dict(llm=str(FIX / "hf/qwen2"), vit=str(FIX / "hf/siglip"), vae=str(FIX / "ae.safetensors"),
              vit_max_num_patch_per_side=5)
  return HFInitArgs(**{**base, **kw})


def key_sources() -> dict[str, tuple[str, str]]:
  out = {}
  for line in (FIX / "expected/key_sources.tsv").read_text().splitlines():
    if line and not line.startswith("#"):
      key, shape, source, rule = line.split("\t")
      out[key] = (shape, source)
  return out


@pytest.fixture(scope="module")
def init() -> HFInit:
  return HFInit(fixture_args())


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
  return read_safetensors(FIX / "expected/ema.safetensors")


@pytest.fixture(scope="module")
def cases() -> dict[str, np.ndarray]:
  with np.load(FIX / "cases.npz") as d:
    return {k: d[k] for k in d.files}


def _fan_in(init: HFInit, key: str) -> int:
  return init.shape_dtype("ema", key.rsplit(".", 1)[0] + ".weight")[0][1]


# ----------------------------------------------------------------------------- the state dict
def test_same_keys_and_shapes(init, expected):
  assert init.keys("ema") == set(expected)
  for k, x in expected.items():
    assert init.shape_dtype("ema", k)[0] == x.shape, k
  dropped = json.loads((FIX / "cases.json").read_text())["hf_vit_dropped"]
  assert init.dropped_keys() == {"llm": [], "vit": sorted(dropped)}


def test_deterministic_tensors_bit_identical(init, expected):
  """Copies, up-casts, the conv->linear reshape, gen-expert copies, ones, zeros: exact; sin-cos to 1e-6."""
  sources = key_sources()
  assert set(sources) == set(expected)
  for k, (_, source) in sources.items():
    ours = init.read("ema", k)
    assert ours.dtype == np.float32, k
    if source == "random":
      bound = 1.0 / np.sqrt(_fan_in(init, k))
      assert ours.shape == expected[k].shape and np.abs(ours).max() <= bound and np.abs(ours).max() > 0.5 * bound, k
    elif k.endswith("pos_embed.pos_embed"):
      assert np.abs(ours - expected[k]).max() <= 1e-6, k
    else:
      np.testing.assert_array_equal(ours, expected[k], err_msg=k)


def test_random_modules_follow_the_seed(init):
  other = HFInit(fixture_args(seed=1))
  for k in sorted(init.keys("ema")):
    same = np.array_equal(init.read("ema", k), other.read("ema", k))
    assert same != k.startswith(RANDOM_MODULES), k
  again = HFInit(fixture_args())
  np.testing.assert_array_equal(again.read("ema", "connector.fc1.weight"), init.read("ema", "connector.fc1.weight"))


def test_vae_is_the_file_unchanged(init):
  ae = read_safetensors(FIX / "ae.safetensors")
  assert init.keys("ae") == set(ae)
  for k, x in ae.items():
    np.testing.assert_array_equal(init.read("ae", k), x)


def test_config_and_special_tokens(init):
  cfg = init.cfg
  assert (cfg.llm.vocab_size, cfg.vit.num_hidden_layers, cfg.max_latent_size, cfg.latent_downsample) == (320, 2, 32, 16)
  assert (cfg.vae.ch, cfg.vae.ch_mult, cfg.vae.num_res_blocks, cfg.vae.z_channels) == (32, (1, 1, 1, 1), 1, 16)
  want = json.loads((FIX / "cases.json").read_text())["new_token_ids"]
  assert {k: getattr(cfg.tokens, k) for k in want} == want
  assert not init.rule.resized


# ----------------------------------------------------------------------------- the vocabulary rule
def test_vocab_resize_to_len_tokenizer(expected, cases):
  init = HFInit(fixture_args(tokenizer=str(FIX / "hf/tokenizer_plain")))
  assert (init.rule.rows, init.rule.len_tokenizer, len(init.rule.new_tokens)) == (324, 324, 4)
  ids = [init.cfg.tokens.bos_token_id, init.cfg.tokens.eos_token_id, init.cfg.tokens.start_of_image,
         init.cfg.tokens.end_of_image]
  assert ids == cases["resize/special_token_ids"].tolist()
  for key, name in (("language_model.model.embed_tokens.weight", "embed_tokens"), ("language_model.lm_head.weight",
                                                                                     "lm_head")):
    table = init.read("ema", key)
    np.testing.assert_array_equal(table[:320], expected[key])
    std = expected[key].std(axis=0)
    assert np.all(np.abs(table[320:] - cases[f"resize/{name}_new_rows"]) <= 1e-3 * std), name
  assert init.read("ema", "language_model.model.layers.0.mlp.up_proj.weight").shape == (128, 64)


def test_vocab_shrinks_to_len_tokenizer(tmp_path, expected):
  """A tokenizer smaller than the embedding table and lacking BAGEL's tokens cuts the table to len(tokenizer)."""
  tok = tmp_path / "tok"
  tok.mkdir()
  vocab = json.loads((FIX / "hf/tokenizer_plain/vocab.json").read_text())
  (tok / "vocab.json").write_text(json.dumps({t: i for t, i in vocab.items() if i < 290}))
  (tok / "merges.txt").write_text("#version: 0.2\n")
  init = HFInit(fixture_args(tokenizer=str(tok)))
  assert (init.rule.rows, init.cfg.tokens.bos_token_id, init.cfg.tokens.end_of_image) == (295, 291, 294)
  key = "language_model.lm_head.weight"
  np.testing.assert_array_equal(init.read("ema", key), expected[key][:295])


# ----------------------------------------------------------------------------- the forward check
def _fixture_batch(model: BagelModel, params, cases) -> Batch:
  """CASES.md's plan: [text(5), vae_image 2x3 latents] and [vit_image 3x4 patches, text(6)]."""
  cfg, tk = model.cfg, model.cfg.tokens
  ids = cases["train/text_ids"].tolist()
  s0 = [L.Text(ids[1:6], loss=True, special_token_loss=True, special_token_label=tk.start_of_image),
        L.VaeImage((2, 3), loss=True)]
  s1 = [L.VitImage((3, 4)), L.Text(ids[-7:-1], loss=True)]
  lay = L.pack([[s0, s1]], L.Capacity(tokens=int(cases["train/sequence_length"][0])), tk, **L.position_args(cfg))
  np.testing.assert_array_equal(L.dense_mask_np(lay), cases["train/dense_mask"].astype(bool))
  np.testing.assert_array_equal(lay.rope_ids[0], cases["train/position_ids"])
  lay = jax.tree.map(jnp.asarray, lay)
  images = jnp.asarray(cases["train/vae_padded_images"]).transpose(0, 2, 3, 1)
  eps = jnp.asarray(cases["train/vae_eps"]).transpose(0, 2, 3, 1)
  mean, logvar = jnp.split(jax.jit(model.encode_moments)(params, images), 2, axis=-1)
  latents = cfg.vae.scale_factor * (mean + jnp.exp(0.5 * logvar) * eps - cfg.vae.shift_factor)
  assert rel_err(latents, cases["train/padded_latent"].transpose(0, 2, 3, 1)) < TOL
  return Batch(layout=lay, vit_patches=jnp.asarray(cases["train/vit_tokens"])[None],
               vae_latents=model.latent_tokens(latents[None], lay), noise=jnp.asarray(cases["train/noise"])[None],
               timesteps=jnp.asarray(cases["train/timesteps"])[None])


class _RecordedRandom:
  """The init with its random modules taken from expected/ (torch's draws are not reproducible)."""

  def __init__(self, init, expected):
    self.init, self.expected = init, expected

  def read(self, file_id, key):
    if file_id == "ema" and key.startswith(RANDOM_MODULES):
      return self.expected[key]
    return self.init.read(file_id, key)


def single_device_params(files, cfg):
  abstract = BagelModel(cfg).abstract_params()
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return place_params(files, cfg, abstract, jax.tree.map(lambda _: dev, abstract))


def test_forward_matches_upstream(init, expected, cases):
  model = BagelModel(init.cfg, attention_impl="reference")
  params = single_device_params(_RecordedRandom(init, expected), init.cfg)
  batch = _fixture_batch(model, params, cases)
  out, (total, parts) = jax.jit(lambda p, b: (model.forward(p, b), model.loss(p, b)))(params, batch)
  assert rel_err(out.llm_input[0], cases["train/llm_input"]) < TOL
  assert rel_err(out.hidden[0], cases["train/hidden"]) < TOL
  assert rel_err(out.ce_logits[0], cases["train/ce_logits"]) < TOL
  assert rel_err(parts.ce_per_token[0], cases["train/ce"]) < TOL
  noisy = np.asarray(batch.layout.vae_noisy[0]) == 1
  np.testing.assert_array_equal(np.asarray(out.velocity[0])[noisy], cases["train/mse_pred"])  # llm2vae is zero
  assert rel_err(parts.ce, cases["train/ce_loss"]) < TOL and rel_err(parts.mse, cases["train/mse_loss"]) < TOL
  assert rel_err(total, cases["train/ce_loss"] + cases["train/mse_loss"]) < TOL


# ----------------------------------------------------------------------------- other shapes and settings
def _variant_cfg():
  """bagel_tiny with GQA ratio 4 and its own grids (none of the fixture's sizes)."""
  import dataclasses
  from bagel_jax.config import bagel_tiny
  c = bagel_tiny()
  return c.replace(llm=dataclasses.replace(c.llm, num_attention_heads=8, num_key_value_heads=2),
                   vit=dataclasses.replace(c.vit, num_hidden_layers=1), max_latent_size=6, vit_max_num_patch_per_side=6)


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
  from bagel_jax.weights.hf_random import write_random_hf
  cfg = _variant_cfg()
  root = tmp_path_factory.mktemp("hf_variant")
  paths = write_random_hf(root, cfg, seed=3, extra_vit_layers=2, lm_head=False)
  args = HFInitArgs(llm=str(paths["llm"]), vit=str(paths["vit"]), vae=str(paths["vae"]), vit_select_layer=-3,
                    vit_max_num_patch_per_side=6, max_latent_size=6)
  return cfg, paths, args


def test_rules_on_other_shapes(variant):
  """GQA 4, vit_select_layer -3 (1 of 3 SigLIP layers), no lm_head in the checkpoint (tied-embedding releases)."""
  from bagel_jax.weights.hf_checkpoint import HFCheckpoint
  cfg, paths, args = variant
  init = HFInit(args)
  assert init.cfg.llm == cfg.llm and init.cfg.vit == cfg.vit and init.cfg.vae.ch_mult == cfg.vae.ch_mult
  assert init.cfg.tokens == cfg.tokens and (init.cfg.max_latent_size, init.cfg.vit_max_num_patch_per_side) == (6, 6)
  llm, vit = HFCheckpoint(paths["llm"], "LLM"), HFCheckpoint(paths["vit"], "SigLIP")
  lm = "language_model."
  for k in init.keys("ema"):
    x = init.read("ema", k)
    if k.startswith(lm) and "_moe_gen" in k:
      np.testing.assert_array_equal(x, init.read("ema", k.replace("_moe_gen", "")), err_msg=k)
    elif "q_norm" in k or "k_norm" in k:
      np.testing.assert_array_equal(x, np.ones(cfg.llm.head_dim, np.float32), err_msg=k)
    elif k.startswith(lm) and k != lm + "lm_head.weight":
      np.testing.assert_array_equal(x, llm.read(k[len(lm):]).astype(np.float32), err_msg=k)
  assert init.shape_dtype("ema", "language_model.model.layers.0.self_attn.k_proj.weight")[0] == (16, 64)
  head = init.read("ema", lm + "lm_head.weight")
  assert head.shape == (512, 64) and 0.015 < head.std() < 0.025  # HF init: N(0, initializer_range)
  conv = vit.read("vision_model.embeddings.patch_embedding.weight")
  np.testing.assert_array_equal(init.read("ema", "vit_model.vision_model.embeddings.patch_embedding.weight"),
                                conv.transpose(0, 2, 3, 1).reshape(conv.shape[0], -1))
  assert not any(".layers.1." in k for k in init.keys("ema") if k.startswith("vit_model."))
  assert len(init.dropped_keys()["vit"]) == 2 * 16 + 11


def test_copy_init_moe_false_keeps_hf_init_for_the_gen_expert(variant):
  _, _, args = variant
  import dataclasses
  init = HFInit(dataclasses.replace(args, copy_init_moe=False))
  q = init.read("ema", "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight")
  assert 0.015 < q.std() < 0.025 and not np.any(init.read("ema", "language_model.model.layers.0.self_attn.q_proj_moe_gen.bias"))
  np.testing.assert_array_equal(init.read("ema", "language_model.model.norm_moe_gen.weight"), np.ones(64, np.float32))


def test_shapes_demo_model_in_hf_format(tmp_path):
  """`python -m bagel_jax.weights.hf_random --preset shapes` gives the init the demo's model (docs/pretraining.md)."""
  from bagel_jax.data import shapes
  from bagel_jax.weights import hf_random
  hf_random.main(["--out", str(tmp_path), "--preset", "shapes"])
  init = HFInit(HFInitArgs(llm=str(tmp_path / "qwen2"), vit=str(tmp_path / "siglip"), vae=str(tmp_path / "ae.safetensors"),
                           vit_max_num_patch_per_side=4, max_latent_size=4, latent_patch_size=4))
  want = shapes.model_config()
  assert (init.cfg.llm, init.cfg.vit, init.cfg.tokens) == (want.llm, want.vit, want.tokens)
  assert (init.cfg.vae.ch_mult, init.cfg.vae.num_res_blocks, init.cfg.vae.z_channels) == (want.vae.ch_mult, 0, 4)
