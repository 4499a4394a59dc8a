"""Bad inference requests are refused with one-line errors that name the limit or the file."""

import numpy as np
import pytest

from bagel_jax.inference import chat, generate
from bagel_jax.api import BagelModel
from bagel_jax.config import load_config
from bagel_jax.inference import ImageInput, InferenceError, Inferencer, TokenizerError, load_image, load_tokenizer
from tests.conftest import FIXTURE_DIR

TOKENIZER = FIXTURE_DIR.parent / "tokenizer" / "tokenizer.json"


@pytest.fixture(scope="module")
def inf():
  cfg = load_config(FIXTURE_DIR)
  model = BagelModel(cfg, attention_impl="reference")
  return Inferencer(model, model.load_upstream(FIXTURE_DIR), load_tokenizer(TOKENIZER))


def _one_line(exc) -> str:
  msg = str(exc.value)
  assert "\n" not in msg
  return msg


@pytest.mark.parametrize("size", [(128, 64), (64, 72)])
def test_image_size_beyond_the_latent_table(inf, size):
  with pytest.raises(InferenceError) as e:
    inf.interleave_inference(["a cat"], image_shapes=size, num_timesteps=3)
  msg = _one_line(e)
  assert f"{size[0]}x{size[1]}" in msg and "64x64" in msg  # max_latent_size 8 x 8 px


def test_image_size_not_a_multiple_of_the_latent_stride(inf):
  with pytest.raises(InferenceError) as e:
    inf.interleave_inference(["a cat"], image_shapes=(30, 32), num_timesteps=3)
  assert "multiples of 8" in _one_line(e)


def test_input_images_beyond_the_tables(inf):
  with pytest.raises(InferenceError) as e:  # ViT table: 8 patches of 14 px
    inf.interleave_inference([ImageInput(vit=np.zeros((126, 28, 3), np.float32)), "what?"],
                             understanding_output=True, max_think_token_n=2)
  assert "112x112" in _one_line(e)
  with pytest.raises(InferenceError) as e:  # VAE conditioning image: latent table 64 px
    inf.interleave_inference([ImageInput(vae=np.zeros((72, 32, 3), np.float32), vit=np.zeros((28, 28, 3), np.float32)),
                              "edit"], num_timesteps=3)
  assert "64x64" in _one_line(e)


@pytest.mark.parametrize("steps", [0, 1])
def test_zero_steps_refused(inf, steps):
  with pytest.raises(InferenceError) as e:
    inf.interleave_inference(["a cat"], image_shapes=(32, 32), num_timesteps=steps)
  assert "at least 2" in _one_line(e) and f"got {steps}" in _one_line(e)


def test_bad_settings(inf):
  with pytest.raises(InferenceError) as e:
    inf.interleave_inference(["a cat"], image_shapes=(32, 32), num_timesteps=3, cfg_renorm_type="layer")
  assert "cfg_renorm_type" in _one_line(e)
  with pytest.raises(InferenceError) as e:
    inf.interleave_inference(["a cat"], understanding_output=True, max_think_token_n=0)
  assert "at least 1" in _one_line(e) and "got 0" in _one_line(e)


def test_missing_tokenizer_is_named(tmp_path):
  with pytest.raises(TokenizerError) as e:
    load_tokenizer(tmp_path)
  assert str(tmp_path / "tokenizer.json") in _one_line(e)
  bad = tmp_path / "tok.json"
  bad.write_text("{not json")
  with pytest.raises(TokenizerError) as e:
    load_tokenizer(bad)
  assert str(bad) in _one_line(e)


def test_corrupt_image_file(tmp_path):
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
  with pytest.raises(InferenceError) as e:
    load_image(bad)
  assert str(bad) in _one_line(e) and "cannot read the image" in _one_line(e)
  truncated = tmp_path / "cut.png"
  from PIL import Image
  Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 7).save(truncated)
  truncated.write_bytes(truncated.read_bytes()[:60])
  with pytest.raises(InferenceError) as e:
    load_image(truncated)
  assert str(truncated) in _one_line(e)
  with pytest.raises(InferenceError) as e:
    load_image(tmp_path / "absent.png")
  assert "not found" in _one_line(e)


def test_cli_errors(tmp_path, capsys):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"garbage")
  rc = generate.main(["--checkpoint", str(FIXTURE_DIR), "--tokenizer", str(TOKENIZER), "--prompt", "x",
                      "--image", str(bad), "--out", str(tmp_path / "o.png")])
  assert rc == 2 and f"error: {bad}: cannot read the image" in capsys.readouterr().err
  rc = generate.main(["--checkpoint", str(FIXTURE_DIR), "--tokenizer", str(TOKENIZER), "--prompt", "x",
                      "--steps", "0", "--out", str(tmp_path / "o.png")])
  assert rc == 2 and "at least 2" in capsys.readouterr().err
  rc = chat.main(["--checkpoint", str(FIXTURE_DIR), "--question", "what?"])  # the fixture has no tokenizer.json
  assert rc == 2 and str(FIXTURE_DIR / "tokenizer.json") in capsys.readouterr().err


@pytest.fixture()
def short_context_inf(inf):
  """The fixture model with max_position_embeddings 40 (its own llm_config.json says 32768)."""
  import dataclasses
  cfg = dataclasses.replace(inf.cfg, llm=dataclasses.replace(inf.cfg.llm, max_position_embeddings=40))
  return Inferencer(inf.model, inf.params, inf.tokenizer), cfg


def test_prompt_beyond_max_position_embeddings(short_context_inf, monkeypatch):
  short, cfg = short_context_inf
  monkeypatch.setattr(short, "cfg", cfg)
  assert load_config(FIXTURE_DIR).llm.max_position_embeddings == 32768  # read from llm_config.json
  calls = []
  monkeypatch.setattr(short, "_timed_prefill", lambda *a: calls.append(a))  # nothing runs once refused
  long_prompt = "a cat " * 30
  with pytest.raises(InferenceError) as e:
    short.interleave_inference([long_prompt], understanding_output=True, max_think_token_n=4)
  msg = _one_line(e)
  assert "max_position_embeddings is 40" in msg and "4 text tokens" in msg and "request 0" in msg
  with pytest.raises(InferenceError) as e:  # the think budget alone pushes a short prompt past the limit
    short.interleave_inference(["a cat"], think=True, max_think_token_n=64, image_shapes=(32, 32), num_timesteps=3)
  assert "64 text tokens + 1 for the image" in _one_line(e)
  assert not calls


def test_prompt_within_max_position_embeddings_runs(short_context_inf, monkeypatch):
  short, cfg = short_context_inf
  monkeypatch.setattr(short, "cfg", cfg)
  out = short.interleave_inference(["a cat"], understanding_output=True, max_think_token_n=4)
  assert len(out) == 1
