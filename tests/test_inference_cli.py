"""The command-line tools on the tiny fixture: generate (text-to-image, edit), chat, and the benchmark."""

import json

import numpy as np
from PIL import Image

from bagel_jax.inference import chat, generate
from tests.conftest import FIXTURE_DIR

TOKENIZER = FIXTURE_DIR.parent / "tokenizer" / "tokenizer.json"
COMMON = ["--checkpoint", str(FIXTURE_DIR), "--tokenizer", str(TOKENIZER)]


def test_generate_text_to_image(tmp_path, capsys):
  out = tmp_path / "cat.png"
  rc = generate.main(COMMON + ["--prompt", "a red cat", "--size", "16x24", "--steps", "3", "--seed", "1",
                              "--out", str(out)])
  assert rc == 0, capsys.readouterr().err
  with Image.open(out) as im:
    assert im.format == "PNG" and im.size == (24, 16)
  assert "denoising" in capsys.readouterr().err  # the progress bar


def test_generate_edit_and_chat(tmp_path, capsys):
  src = tmp_path / "in.png"
  Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)).save(src)
  out = tmp_path / "edit.png"
  rc = generate.main(COMMON + ["--prompt", "make it night", "--image", str(src), "--steps", "3", "--out", str(out),
                              "--no-progress"])
  assert rc == 0, capsys.readouterr().err
  with Image.open(out) as im:  # upstream's VAE resize of 70x50 with the tiny tables: 64x48
    assert im.size == (64, 48)
  capsys.readouterr()
  rc = chat.main(COMMON + ["--image", str(src), "--question", "What is this?", "--max-tokens", "6"])
  assert rc == 0
  assert capsys.readouterr().out.strip() != ""


def test_bench_tiny(tmp_path, capsys):
  from bagel_jax.bench import generate as bench
  out = tmp_path / "bench.json"
  # the size and prompt bucket of test_generate_text_to_image: its compiled sampler is reused
  assert bench.main(["--config", "tiny", "--size", "16x24", "--steps", "3", "--decode-tokens", "8", "--prompt-tokens", "8",
                     "--out", str(out)]) == 0
  res = json.loads(out.read_text())
  assert res["config"] == "tiny" and res["euler_steps"] == 2
  assert res["per_step_s"] > 0 and res["decode_tokens_per_s"] > 0


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
