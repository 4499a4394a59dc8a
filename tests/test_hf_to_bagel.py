"""`python -m convert.hf_to_bagel`: the folder it writes loads everywhere and gives upstream's init; bad inputs refused."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from bagel_jax.api import BagelModel
from bagel_jax.config import load_config
from bagel_jax.weights.hf_init import HFInit
from bagel_jax.weights.safetensors_io import SafetensorsWriter, read_safetensors
from convert import hf_to_bagel
from tests.test_hf_init import FIX, RANDOM_MODULES, fixture_args, single_device_params

ARGS = ["--llm", FIX / "hf/qwen2", "--vit", FIX / "hf/siglip", "--vae", FIX / "ae.safetensors",
        "--vit_max_num_patch_per_side", "5", "--quiet"]


def run(argv, capsys) -> tuple[int, str]:
  with pytest.raises(SystemExit) as e:
    hf_to_bagel.run([str(a) for a in argv])
  return e.value.code, capsys.readouterr().err


def assert_refused(argv, capsys, *words):
  dst = pathlib.Path(argv[argv.index("--dst") + 1])
  rc, err = run(argv, capsys)
  assert rc == 2, err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  for w in words:
    assert str(w) in err, (w, err)
  assert not dst.exists() and not list(dst.parent.glob(f".{dst.name}.tmp-*"))


def same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  out = tmp_path_factory.mktemp("hf2bagel")
  hf_to_bagel.main([str(a) for a in ARGS + ["--dst", out / "release"]])
  hf_to_bagel.main([str(a) for a in ARGS + ["--dst", out / "orbax", "--format", "orbax"]])
  hf_to_bagel.main([str(a) for a in ARGS + ["--dst", out / "bf16", "--dtype", "bfloat16"]])
  init = HFInit(fixture_args())
  return out, init, single_device_params(init, init.cfg)


def test_release_folder_is_upstreams_state_dict(converted):
  out, init, _ = converted
  ema, expected = read_safetensors(out / "release/ema.safetensors"), read_safetensors(FIX / "expected/ema.safetensors")
  assert set(ema) == set(expected)
  for k, x in expected.items():
    assert ema[k].dtype == np.float32
    if not k.startswith(RANDOM_MODULES) and not k.endswith("pos_embed"):
      np.testing.assert_array_equal(ema[k], x, err_msg=k)
  assert (out / "release/ae.safetensors").read_bytes() == (FIX / "ae.safetensors").read_bytes()
  assert (out / "release/llm_config.json").read_text() == (FIX / "expected/llm_config.json").read_text()
  vit = json.loads((out / "release/vit_config.json").read_text())
  assert json.loads((FIX / "expected/vit_config.json").read_text()).items() <= vit.items()
  assert load_config(out / "release") == init.cfg and load_config(out / "orbax") == init.cfg


def test_release_and_orbax_folders_load_in_inference_and_give_the_same_params(converted):
  from bagel_jax.inference.inferencer import Inferencer
  from bagel_jax.weights.load import load_checkpoint
  out, init, params = converted
  model = BagelModel(init.cfg)
  same_params(model.load_upstream(out / "release"), params)
  same_params(load_checkpoint(out / "orbax"), params)
  bf16 = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16).astype(np.float32), params)
  bf16["vae"] = params["vae"]  # ae.safetensors stays float32
  same_params(model.load_upstream(out / "bf16"), bf16)
  inf = Inferencer.from_checkpoint(out / "release", dtype=jax.numpy.float32, attention_impl="reference")
  same_params(inf.params, params)
  assert inf.tokenizer.token_to_id("<|vision_start|>") == init.cfg.tokens.start_of_image


# ----------------------------------------------------------------------------- refusals, one line each
def _copy(tmp_path, name="qwen2") -> pathlib.Path:
  dst = tmp_path / name
  shutil.copytree(FIX / "hf" / name, dst)
  return dst


def _rewrite(path: pathlib.Path, edit) -> None:
  t = read_safetensors(path)
  edit(t)
  w = SafetensorsWriter(path, [(k, t[k].shape, {"float32": "F32", "int32": "I32"}.get(str(t[k].dtype), "BF16"))
                               for k in sorted(t)])
  for k in sorted(t):
    w.write(k, t[k])
  w.close()


def _with(argv, flag, value):
  argv = list(argv)
  argv[argv.index(flag) + 1] = value
  return argv


def test_missing_shard(tmp_path, capsys):
  llm = _copy(tmp_path)
  (llm / "model-00002-of-00002.safetensors").unlink()
  assert_refused(_with(ARGS, "--llm", llm) + ["--dst", tmp_path / "o"], capsys, "model-00002-of-00002.safetensors",
                 "does not exist")


def test_index_lists_a_key_its_shard_lacks(tmp_path, capsys):
  llm = _copy(tmp_path)
  index = json.loads((llm / "model.safetensors.index.json").read_text())
  index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
  (llm / "model.safetensors.index.json").write_text(json.dumps(index))
  assert_refused(_with(ARGS, "--llm", llm) + ["--dst", tmp_path / "o"], capsys, "model.norm.weight", "not in this shard")


def test_shape_mismatch(tmp_path, capsys):
  llm = _copy(tmp_path)
  key = "model.layers.0.mlp.up_proj.weight"
  _rewrite(llm / "model-00001-of-00002.safetensors", lambda t: t.__setitem__(key, t[key][:-1].copy()))
  assert_refused(_with(ARGS, "--llm", llm) + ["--dst", tmp_path / "o"], capsys, key, "[127, 64]", "[128, 64]")


def test_dtype_mismatch(tmp_path, capsys):
  vit = _copy(tmp_path, "siglip")
  key = "vision_model.post_layernorm.bias"
  _rewrite(vit / "model.safetensors", lambda t: t.__setitem__(key, t[key].astype(np.int32)))
  assert_refused(_with(ARGS, "--vit", vit) + ["--dst", tmp_path / "o"], capsys, key, "I32")


def test_siglip_grid_must_match_vit_max_num_patch_per_side(tmp_path, capsys):
  assert_refused(_with(ARGS, "--vit_max_num_patch_per_side", "70") + ["--dst", tmp_path / "o"], capsys,
                 "config.json", "5x5", "vit_max_num_patch_per_side is 70")


def test_tokenizer_without_files(tmp_path, capsys):
  (tmp_path / "tok").mkdir()
  assert_refused(ARGS + ["--tokenizer", tmp_path / "tok", "--dst", tmp_path / "o"], capsys, "tok",
                 "not a Qwen2 tokenizer folder")


def test_tokenizer_special_token_outside_the_embeddings(tmp_path, capsys):
  tok = _copy(tmp_path)
  cfg = json.loads((tok / "tokenizer_config.json").read_text())
  cfg["added_tokens_decoder"]["400"] = cfg["added_tokens_decoder"].pop("285")
  (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
  assert_refused(ARGS + ["--tokenizer", tok, "--dst", tmp_path / "o"], capsys, "<|vision_start|>", "400", "320")


@pytest.mark.parametrize("flag,value,words", [
    ("--vit_select_layer", "-5", ("vit_select_layer -5", "3 layers")),
])
def test_unsupported_settings(tmp_path, capsys, flag, value, words):
  assert_refused(ARGS + [flag, value, "--dst", tmp_path / "o"], capsys, *words)


def test_missing_inputs(tmp_path, capsys):
  assert_refused(_with(ARGS, "--vae", tmp_path / "none.safetensors") + ["--dst", tmp_path / "o"], capsys,
                 "none.safetensors", "not found")
  llm = _copy(tmp_path)
  (llm / "config.json").unlink()
  assert_refused(_with(ARGS, "--llm", llm) + ["--dst", tmp_path / "o"], capsys, "config.json", "not found")


def test_existing_destination_is_kept(tmp_path, capsys):
  dst = tmp_path / "o"
  dst.mkdir()
  (dst / "mine.txt").write_text("keep")
  rc, err = run(ARGS + ["--dst", dst], capsys)
  assert rc == 2 and "destination exists" in err and (dst / "mine.txt").read_text() == "keep"
