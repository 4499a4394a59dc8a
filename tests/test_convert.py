"""The converters: safetensors -> Orbax -> safetensors round trips, restores, shardings, forward parity."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.weights import table as W
from bagel_jax.bench.convert import PRESETS, scaled_config, write_synthetic_release
from bagel_jax.weights.orbax_stream import CONVERSION_FILE, STATE_DIR, OrbaxState
from bagel_jax.weights.safetensors_io import SafetensorsFile, SafetensorsWriter, read_safetensors
from bagel_jax.weights.load import fsdp_shardings, load_checkpoint
from bagel_jax.config import load_config
from convert.orbax_to_safetensors import export
from convert.safetensors_to_orbax import convert, main_wrapper, main as convert_main
FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures" / "bagel_tiny_a"

MANIFEST = pathlib.Path(__file__).parent / "fixtures" / "ema_manifest.tsv"


def assert_same_tensors(a_dir: pathlib.Path, b_dir: pathlib.Path) -> int:
  """Every tensor of the release folder a_dir (single file or shards) is in b_dir, bit for bit."""
  def tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
      out.update({k: (f.name.startswith("ae"), v) for k, v in read_safetensors(f).items()})
    return out
  a, b = tensors(a_dir), tensors(b_dir)
  assert sorted(a) == sorted(b)
  for k, (a_ae, x) in a.items():
    b_ae, y = b[k]
    assert a_ae == b_ae, k
    assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype, x.shape, y.shape)
    assert x.tobytes() == y.tobytes(), k
  return len(a)


@pytest.fixture(scope="module")
def tiny_orbax(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("conv") / "tiny_orbax"
  convert(FIXTURE_DIR, out, progress=False)
  return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> pathlib.Path:
  """The full release key set (1223 ema tensors + the FLUX ae) at scaled-down widths."""
  src = tmp_path_factory.mktemp("syn") / "release"
  write_synthetic_release(src, scaled_config(**PRESETS["test"]), seed=1)
  return src


def test_tiny_round_trip_is_bit_identical(tiny_orbax, tmp_path):
  back = tmp_path / "back"
  s = export(tiny_orbax, back, progress=False)
  n = assert_same_tensors(FIXTURE_DIR, back)
  assert s.tensors == n == len(W.rules(load_config(FIXTURE_DIR)))
  for f in ("ema.safetensors", "ae.safetensors"):  # same header layout too: the files are byte-identical
    assert (FIXTURE_DIR / f).read_bytes() == (back / f).read_bytes()
  assert load_config(back) == load_config(FIXTURE_DIR)


def test_output_folder_is_self_contained(tiny_orbax):
  assert load_config(tiny_orbax) == load_config(FIXTURE_DIR)
  for f in ("llm_config.json", "vit_config.json", "bagel_config.json"):
    assert (tiny_orbax / f).read_bytes() == (FIXTURE_DIR / f).read_bytes()
  info = json.loads((tiny_orbax / CONVERSION_FILE).read_text())
  assert info["tensors"] == len(W.rules(load_config(FIXTURE_DIR)))
  assert info["config"]["llm"]["hidden_size"] == load_config(FIXTURE_DIR).llm.hidden_size
  state = OrbaxState(tiny_orbax / STATE_DIR)
  assert str(state.get(("bagel", "llm", "layers", "gate_proj", "kernel")).dtype) == "bfloat16"
  assert str(state.get(("vae", "encoder", "conv_in", "kernel")).dtype) == "float32"
  assert not list(tiny_orbax.parent.glob(".tiny_orbax.*"))  # no temporary folder left beside it


def test_restored_state_gives_the_same_forward_as_safetensors(tiny_orbax):
  from bagel_jax.api import BagelModel
  from bagel_jax.demo import fixture_batch, load_cases

  cfg = load_config(tiny_orbax)
  model = BagelModel(cfg)
  direct = model.load_upstream(FIXTURE_DIR)
  restored = load_checkpoint(tiny_orbax, dtype=jnp.float32)
  assert jax.tree.structure(direct) == jax.tree.structure(restored)
  for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  batch, _ = fixture_batch(FIXTURE_DIR, load_cases(FIXTURE_DIR), model, direct)
  fwd = jax.jit(model.forward)
  outs = [jax.device_get(fwd(params, batch)) for params in (direct, restored)]
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_array_equal(a, b)


def test_restore_onto_8_devices_with_fsdp_shardings(tiny_orbax):
  from jax.sharding import NamedSharding, PartitionSpec as P

  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  host = load_checkpoint(tiny_orbax)  # one device, stored dtypes
  want = fsdp_shardings(host, mesh)
  got = load_checkpoint(tiny_orbax, shardings=want)
  n_split = 0
  for (path, x), s, h in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), jax.tree.leaves(host)):
    assert x.sharding == s, (jax.tree_util.keystr(path), x.sharding, s)
    assert x.dtype == h.dtype and x.shape == h.shape
    shard_shape = s.shard_shape(x.shape)
    assert {tuple(sh.data.shape) for sh in x.addressable_shards} == {shard_shape}
    n_split += shard_shape != x.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(h))
  # The big stacked kernels are split on their largest axis: [layer, expert, in, out] over 'fsdp'.
  gate = got["bagel"]["llm"]["layers"]["gate_proj"]["kernel"]
  assert gate.sharding == NamedSharding(mesh, P(None, None, None, "fsdp"))
  assert gate.addressable_shards[0].data.shape == gate.shape[:3] + (gate.shape[3] // 8,)
  assert n_split > len(jax.tree.leaves(got)) // 2

  # A function of (path, abstract leaf) works as well, e.g. replicate everything but the embedding.
  rep = NamedSharding(mesh, P())
  emb = NamedSharding(mesh, P("fsdp", None))
  got2 = load_checkpoint(tiny_orbax, shardings=lambda p, x: emb if p[-1] == "embed_tokens" else rep)
  assert got2["bagel"]["llm"]["embed_tokens"].sharding == emb
  assert got2["vae"]["encoder"]["conv_in"]["kernel"].sharding == rep


def test_restore_with_mesh_uses_the_project_rules(tiny_orbax):
  from bagel_jax import sharding as S

  mesh = S.make_mesh("fsdp=4,tensor=2")
  got = load_checkpoint(tiny_orbax, mesh=mesh)
  want = S.param_shardings(got, mesh)
  for x, s in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert x.sharding == s


def test_synthetic_full_release_key_set_round_trip(synthetic, tmp_path):
  manifest = {ln.split("\t")[0] for ln in MANIFEST.read_text().splitlines() if ln and not ln.startswith("#")}
  assert set(SafetensorsFile(synthetic / "ema.safetensors").entries) == manifest  # all 1223 release keys
  out, back = tmp_path / "orbax", tmp_path / "back"
  s = convert(synthetic, out, progress=False)
  assert s.tensors == len(manifest) + len(SafetensorsFile(synthetic / "ae.safetensors").entries)
  export(out, back, progress=False)
  assert assert_same_tensors(synthetic, back) == s.tensors
  for f in ("ema.safetensors", "ae.safetensors"):
    assert (synthetic / f).read_bytes() == (back / f).read_bytes()
  for f in ("tokenizer_config.json", "merges.txt", "llm_config.json", "vit_config.json", "bagel_config.json"):
    assert (out / f).is_file() and (back / f).is_file(), f
  # 28 MoT layers x 2 experts stacked into one array per parameter.
  meta = OrbaxState(out / STATE_DIR).get(("bagel", "llm", "layers", "down_proj", "kernel"))
  cfg = load_config(out)
  assert tuple(meta.shape) == (28, 2, cfg.llm.intermediate_size, cfg.llm.hidden_size)
  assert_layers_slotted(synthetic, out)


# Upstream name -> our stacked leaf, written out here (not taken from the converter's table).
# Linear weights [out, in] are stored transposed, [in, out]; "" / "_moe_gen" are experts 0 / 1.
LLM_SLOTS = [("self_attn.q_proj{g}.weight", "q_proj/kernel", True), ("self_attn.k_proj{g}.bias", "k_proj/bias", False),
             ("self_attn.o_proj{g}.weight", "o_proj/kernel", True), ("self_attn.q_norm{g}.weight", "q_norm", False),
             ("mlp{g}.down_proj.weight", "down_proj/kernel", True), ("mlp{g}.gate_proj.weight", "gate_proj/kernel", True),
             ("input_layernorm{g}.weight", "input_layernorm", False)]
VIT_SLOTS = [("self_attn.out_proj.weight", "out_proj/kernel", True), ("mlp.fc1.bias", "fc1/bias", False),
             ("layer_norm2.weight", "layer_norm2/scale", False)]


def assert_layers_slotted(release: pathlib.Path, converted: pathlib.Path) -> None:
  """Stored slices [layer, expert] equal the source tensors (transposed for kernels) for the first,
  a middle and the last layer and both experts: a layer or expert put in the wrong place (the
  same mistake in both directions still round-trips) shows here."""
  src = read_safetensors(release / "ema.safetensors")
  ours = load_checkpoint(converted)["bagel"]
  leaf = lambda tree, path: functools.reduce(lambda t, k: t[k], path.split("/"), tree)
  bits = lambda x: np.asarray(x).view(np.uint16)  # bfloat16, compared bit for bit
  n_llm, n_vit = leaf(ours, "llm/layers/q_proj/kernel").shape[0], leaf(ours, "vit/layers/fc1/bias").shape[0]
  checked = 0
  for layer in (0, 1, 13, n_llm - 1):
    for expert, g in enumerate(("", "_moe_gen")):
      for name, path, linear in LLM_SLOTS:
        want = src[f"language_model.model.layers.{layer}.{name.format(g=g)}"]
        got = leaf(ours["llm"]["layers"], path)[layer, expert]
        np.testing.assert_array_equal(bits(got), bits(want.T if linear else want), err_msg=f"{path} {layer} {expert}")
        checked += 1
  for layer in (0, 1, n_vit - 1):
    for name, path, linear in VIT_SLOTS:
      want = src[f"vit_model.vision_model.encoder.layers.{layer}.{name}"]
      got = leaf(ours["vit"]["layers"], path)[layer]
      np.testing.assert_array_equal(bits(got), bits(want.T if linear else want), err_msg=f"vit {path} {layer}")
      checked += 1
  assert checked == 4 * 2 * len(LLM_SLOTS) + 3 * len(VIT_SLOTS)


def test_sharded_input_round_trip(tmp_path):
  src = tmp_path / "sharded"
  write_synthetic_release(src, scaled_config(**PRESETS["test"]), seed=2, shards=3)
  assert not (src / "ema.safetensors").exists() and len(list(src.glob("model-*.safetensors"))) == 3
  out, back = tmp_path / "orbax", tmp_path / "back"
  convert(src, out, progress=False)
  assert not (out / "model.safetensors.index.json").exists()
  export(out, back, progress=False)
  assert assert_same_tensors(src, back) > 1223  # the export writes one ema.safetensors


def test_float32_storage_round_trip(tmp_path):
  out, back = tmp_path / "orbax32", tmp_path / "back"
  convert(FIXTURE_DIR, out, dtype="float32", progress=False)
  state = OrbaxState(out / STATE_DIR)
  assert str(state.get(("bagel", "llm", "embed_tokens")).dtype) == "float32"
  p = load_checkpoint(out)
  assert {str(x.dtype) for x in jax.tree.leaves(p)} == {"float32"}
  export(out, back, progress=False)  # back to upstream's bf16 / f32: exact, since bf16 -> f32 is
  assert assert_same_tensors(FIXTURE_DIR, back) > 0


def test_blocked_transposed_write_matches_the_table(tmp_path):
  rng = np.random.default_rng(0)
  xs = {"a": rng.standard_normal((37, 23)).astype(np.float32),
        "b": rng.standard_normal((5, 300)).astype(jnp.bfloat16)}
  entries = [(k, v.shape, "F32" if v.dtype == np.float32 else "BF16") for k, v in xs.items()]
  for block in (1, 64, 1 << 20):
    w = SafetensorsWriter(tmp_path / f"t{block}.safetensors", entries)
    for k, v in xs.items():
      w.write_transposed(k, W.to_ours(W.LINEAR, v), block_bytes=block)
    w.close()
    got = read_safetensors(tmp_path / f"t{block}.safetensors")
    for k, v in xs.items():
      assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes()


def test_state_is_a_plain_orbax_checkpoint(tiny_orbax):
  """Orbax's own restores read it: V0 StandardCheckpointer and V1 `load`, into shardings."""
  import orbax.checkpoint as ocp
  from orbax.checkpoint import v1 as ocp1
  from jax.sharding import NamedSharding, PartitionSpec as P

  ref = load_checkpoint(tiny_orbax)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), ref)
  for got in (ocp.StandardCheckpointer().restore(tiny_orbax / STATE_DIR, abstract),
              ocp1.load(tiny_orbax / STATE_DIR, abstract)):
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      assert b.sharding == NamedSharding(mesh, P())
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_checkpoint_is_exported():
  import bagel_jax
  assert bagel_jax.load_checkpoint is load_checkpoint


def test_cli_prints_a_summary_line(tmp_path, capsys):
  rc = main_wrapper(convert_main, ["--src", str(FIXTURE_DIR), "--dst", str(tmp_path / "o"), "--quiet"])
  assert rc == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and out[0].startswith("converted 307 tensors, ") and "GB/s" in out[0]
