"""The trainer starts from Hugging Face checkpoints (`init.hf`) through the same code as the converter,
sharded on restore; the converted folder gives the same parameters; configs/bagel_7b_pretrain.py uses it."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from bagel_jax import sharding as shd
from bagel_jax import train
from bagel_jax.api import BagelModel
from bagel_jax.train import loop
from bagel_jax.train.config import TrainConfigError, model_config
from bagel_jax.weights.hf_init import HFInit
from tests.test_hf_init import FIX, fixture_args, single_device_params

REPO = pathlib.Path(__file__).resolve().parent.parent


def _config(name: str):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _tiny_hf(tmp_path, **hf):
  c = _config("tiny")
  c.init.hf.update(llm=str(FIX / "hf/qwen2"), vit=str(FIX / "hf/siglip"), vae=str(FIX / "ae.safetensors"),
                   vit_max_num_patch_per_side=5, **hf)
  c.tokenizer = ""  # the init's (Qwen2.5-style) tokenizer

  for g in c.data.groups.values():
    g.data_dir = str(tmp_path / "tfds")
  c.train.mesh = "fsdp=2,tensor=4"
  return c


def _placed(setup, mesh_spec):
  model = BagelModel(setup.model_cfg)
  mesh = shd.make_mesh(mesh_spec)
  abstract = model.abstract_params()
  sh = shd.param_shardings(abstract["bagel"], mesh)
  repl = jax.sharding.NamedSharding(mesh, jax.P())
  bagel, vae = loop.init_params(setup, model, None, sh, jax.tree.map(lambda _: repl, abstract["vae"]))
  assert jax.tree.all(jax.tree.map(lambda a, s: a.sharding == s and a.dtype == jax.numpy.float32, bagel, sh))
  return {"bagel": bagel, "vae": vae}


def _same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_init_hf_builds_config_tokenizer_and_sharded_params(tmp_path):
  setup = train.prepare(_tiny_hf(tmp_path), tmp_path / "w")
  init = HFInit(fixture_args())
  assert setup.model_cfg == init.cfg
  assert (tmp_path / "w/hf_init/tokenizer.json").is_file() and (tmp_path / "w/hf_init/bagel_config.json").is_file()
  assert setup.tokenizer.token_to_id("<|vision_start|>") == init.cfg.tokens.start_of_image == 285
  _same(_placed(setup, "fsdp=4,tensor=2"), single_device_params(init, init.cfg))


def test_converted_folder_gives_the_trainer_the_same_params(tmp_path):
  from convert import hf_to_bagel
  out = tmp_path / "converted"
  hf_to_bagel.main([str(a) for a in ["--llm", FIX / "hf/qwen2", "--vit", FIX / "hf/siglip", "--vae",
                                     FIX / "ae.safetensors", "--vit_max_num_patch_per_side", "5", "--quiet",
                                     "--dst", out]])
  c = _tiny_hf(tmp_path)
  c.init.hf.llm = ""
  c.model.checkpoint = c.init.checkpoint = c.tokenizer = str(out)
  setup = train.prepare(c, tmp_path / "w")
  init = HFInit(fixture_args())
  _same(_placed(setup, "fsdp=8"), single_device_params(init, init.cfg))


@pytest.mark.parametrize("edit,words", [
    (lambda c: setattr(c.init, "checkpoint", "/x"), "init.hf and init.checkpoint"),
    (lambda c: c.init.hf.update(vit_max_num_patch_per_side=70), "vit_max_num_patch_per_side is 70"),
])
def test_init_hf_refusals(tmp_path, edit, words):
  c = _tiny_hf(tmp_path)
  edit(c)
  with pytest.raises(TrainConfigError, match=words) as e:
    train.prepare(c, tmp_path / "w")
  assert "\n" not in str(e.value)


def test_pretrain_config_is_upstreams_recipe_from_hf_checkpoints():
  c = _config("bagel_7b_pretrain")
  hf = c.init.hf
  assert hf.llm.endswith("Qwen2.5-7B-Instruct") and hf.vit.endswith("siglip-so400m-14-980-flash-attn2-navit")
  assert (hf.vit_select_layer, hf.vit_max_num_patch_per_side, hf.max_latent_size, hf.latent_patch_size) == (-2, 70, 32, 2)
  assert (hf.llm_qk_norm, hf.tie_word_embeddings, hf.copy_init_moe, hf.interpolate_pos) == (True, False, True, False)
  assert c.model.checkpoint == c.init.checkpoint == c.tokenizer == ""
  assert (c.optim.lr, c.optim.freeze_llm, c.optim.freeze_vit, c.optim.freeze_und) == (1e-4, False, False, False)
  with pytest.raises(TrainConfigError, match="Qwen2.5-7B-Instruct"):
    model_config(c)  # the placeholder paths are not here: one line naming the folder
