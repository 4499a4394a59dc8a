"""The command-line tools on the tiny fixture: generate (text-to-image, edit), chat, and the benchmark."""

import json

import numpy as np
import pytest
from PIL import Image

from bagel_jax.inference import Inferencer, chat, generate, load_image
from bagel_jax.inference import kv_cache as kc
from bagel_jax.inference.quantize import QuantizedArray
from tests.conftest import FIXTURE_DIR

TOKENIZER = FIXTURE_DIR.parent / "tokenizer" / "tokenizer.json"
COMMON = ["--checkpoint", str(FIXTURE_DIR), "--tokenizer", str(TOKENIZER)]


@pytest.fixture
def spy(monkeypatch):
  """Records what the CLIs hand the Inferencer (the loaded inferencer and every call's settings);
  the real methods run."""
  seen = {"loads": [], "calls": [], "outputs": []}
  load, call = Inferencer.from_checkpoint.__func__, Inferencer.interleave_inference

  def from_checkpoint(cls, folder, **kw):
    inf = load(cls, folder, **kw)
    seen["loads"].append((kw, inf))
    return inf

  def interleave_inference(self, items, **kw):
    seen["calls"].append((items, kw))
    seen["outputs"].append(call(self, items, **kw))
    return seen["outputs"][-1]

  monkeypatch.setattr(Inferencer, "from_checkpoint", classmethod(from_checkpoint))
  monkeypatch.setattr(Inferencer, "interleave_inference", interleave_inference)
  return seen


# Upstream's notebook settings (the CLI's defaults), written out here.
T2I_DEFAULTS = dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global",
                    cfg_renorm_min=0.0, timestep_shift=3.0, think=False)
EDIT_DEFAULTS = dict(T2I_DEFAULTS, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")


def _settings(kw: dict, keys) -> dict:
  return {k: (tuple(kw[k]) if isinstance(kw[k], (list, tuple)) else kw[k]) for k in keys}


def test_generate_text_to_image(tmp_path, capsys, spy):
  out = tmp_path / "cat.png"
  rc = generate.main(COMMON + ["--prompt", "a red cat", "--size", "16x24", "--steps", "3", "--seed", "1",
                              "--out", str(out)])
  assert rc == 0, capsys.readouterr().err
  with Image.open(out) as im:
    assert im.format == "PNG" and im.size == (24, 16)
  assert "denoising" in capsys.readouterr().err  # the progress bar
  [(items, kw)] = spy["calls"]
  assert items == ["a red cat"] and _settings(kw, T2I_DEFAULTS) == T2I_DEFAULTS
  assert kw["num_timesteps"] == 3 and kw["seed"] == 1 and tuple(kw["image_shapes"]) == (16, 24)
  assert spy["loads"][0][0]["quantize"] == "none"


def test_generate_edit_and_chat(tmp_path, capsys, spy):
  src = tmp_path / "in.png"
  Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)).save(src)
  out = tmp_path / "edit.png"
  rc = generate.main(COMMON + ["--prompt", "make it night", "--image", str(src), "--steps", "3", "--out", str(out),
                              "--no-progress"])
  assert rc == 0, capsys.readouterr().err
  with Image.open(out) as im:  # upstream's VAE resize of 70x50 with the tiny tables: 64x48
    assert im.size == (64, 48)
    got = np.asarray(im)
  [(items, kw)] = spy["calls"]
  assert _settings(kw, EDIT_DEFAULTS) == EDIT_DEFAULTS and kw["num_timesteps"] == 3 and kw["seed"] == 0
  # the PNG is what a direct call with upstream's edit settings and the same seed gives
  inf = spy["loads"][0][1]
  [[want]] = inf.batch([[load_image(src), "make it night"]], num_timesteps=3, seed=0, output="array",
                     **{k: v for k, v in EDIT_DEFAULTS.items() if k != "think"})
  np.testing.assert_array_equal(got, want)
  capsys.readouterr()
  rc = chat.main(COMMON + ["--image", str(src), "--question", "What is this?", "--max-tokens", "6"])
  assert rc == 0
  answer = capsys.readouterr().out.strip()
  _, kw = spy["calls"][-1]
  assert kw["understanding_output"] is True and kw["do_sample"] is False and kw["max_think_token_n"] == 6
  [[want]] = inf.batch([[load_image(src), "What is this?"]], understanding_output=True, max_think_token_n=6)
  assert answer == want.strip() != ""


def test_generate_think_with_int8_weights(tmp_path, capsys, spy):
  """--think prints the plan and hands think=True to the inferencer; --quantize int8 loads int8 kernels."""
  out = tmp_path / "plan.png"
  rc = generate.main(COMMON + ["--prompt", "a red cat", "--size", "16x16", "--steps", "2", "--think",
                              "--max-think-tokens", "5", "--quantize", "int8", "--out", str(out), "--no-progress"])
  assert rc == 0, capsys.readouterr().err
  [(kw_load, inf)] = spy["loads"]
  [(_, kw)] = spy["calls"]
  assert kw_load["quantize"] == "int8" and kw["think"] is True and kw["max_think_token_n"] == 5
  kernel = inf.params["bagel"]["llm"]["layers"]["gate_proj"]["kernel"]
  assert isinstance(kernel, QuantizedArray) and kernel.q.dtype == np.int8
  [[plan, image]] = spy["outputs"]
  assert isinstance(plan, str) and plan.strip()
  assert capsys.readouterr().out == plan + "\n"  # the plan, printed
  with Image.open(out) as im:
    np.testing.assert_array_equal(np.asarray(im), np.asarray(image))


def test_bench_tiny(tmp_path, capsys):
  from bagel_jax.bench import generate as bench
  out = tmp_path / "bench.json"
  # the size and prompt bucket of test_generate_text_to_image: its compiled sampler is reused
  assert bench.main(["--config", "tiny", "--size", "16x24", "--steps", "3", "--decode-tokens", "8", "--prompt-tokens", "8",
                     "--out", str(out)]) == 0
  res = json.loads(out.read_text())
  assert json.loads(capsys.readouterr().out) == res  # printed and written alike
  assert res["config"] == "tiny" and res["euler_steps"] == 2 and res["size"] == "16x24"
  assert res["weights"] == "bagel_tiny_a fixture" and res["dtype"] == "float32"
  assert res["decode_tokens"] == kc.bucket(8)  # the decode length is bucketed
  # the figures are consistent with each other: phases of the timed call within its end-to-end time,
  # the per-step figure the denoising time over the Euler steps (5-decimal rounding)
  phases = res["prefill_s"] + res["denoise_s"] + res["vae_decode_s"]
  assert 0 < phases <= res["end_to_end_s"] + 3e-3, res
  assert abs(res["per_step_s"] - res["denoise_s"] / 2) <= 1e-4 and res["per_step_s"] > 0
  assert res["decode_tokens_per_s"] > 0
  from bagel_jax.weights.safetensors_io import SafetensorsFile
  n = sum(int(np.prod(e.shape)) for f in ("ema.safetensors", "ae.safetensors")
          for e in SafetensorsFile(FIXTURE_DIR / f).entries.values())
  assert abs(res["param_gb"] - 4 * n / 2**30) <= 1e-3, (res["param_gb"], 4 * n / 2**30)  # float32 on CPU


def test_generate_from_a_converted_orbax_folder(tmp_path, capsys):
  """The CLIs read a folder converted by convert.safetensors_to_orbax like the release folder itself."""
  from convert.safetensors_to_orbax import main as convert_main
  converted = tmp_path / "orbax"
  convert_main(["--src", str(FIXTURE_DIR), "--dst", str(converted)])
  assert (converted / "state").is_dir()
  outs = {}
  for name, folder in (("release", FIXTURE_DIR), ("orbax", converted)):
    outs[name] = tmp_path / f"{name}.png"
    rc = generate.main(["--checkpoint", str(folder), "--tokenizer", str(TOKENIZER), "--prompt", "a red cat",
                        "--size", "16x16", "--steps", "3", "--seed", "2", "--out", str(outs[name]), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
  a, b = (np.asarray(Image.open(outs[k])) for k in ("release", "orbax"))
  np.testing.assert_array_equal(a, b)
  assert a.std() > 0  # a real image, not a blank
