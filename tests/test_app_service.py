"""The web app's request layer without a browser: upstream's settings, bad input, progress, one request at
a time, and loading a training run (the shapes demo's `runs/shapes` layout) for the app."""

from __future__ import annotations

import json
import threading

import jax
import numpy as np
import pytest
from PIL import Image

from bagel_jax.app import service as svc
from tests.conftest import FIXTURE_DIR

TOKENIZER = FIXTURE_DIR.parent / "tokenizer" / "tokenizer.json"


def test_upstream_settings():
  # Upstream app.py's ratio table at 1024, and its defaults per tab.
  assert [svc.ratio_shape(r, 1024, 16) for r in svc.RATIOS] == [(1024, 1024), (768, 1024), (1024, 768), (576, 1024),
                                                                  (1024, 576)]
  assert svc.ratio_shape("4:3", 64, 8) == (48, 64)
  assert (svc.T2I.cfg_text_scale, svc.T2I.cfg_interval, svc.T2I.cfg_renorm_type, svc.T2I.num_timesteps,
          svc.T2I.timestep_shift, svc.T2I.max_think_token_n, svc.T2I.text_temperature) == (4.0, 0.4, "global", 50, 3.0,
                                                                                           1024, 0.3)
  assert (svc.EDIT.cfg_img_scale, svc.EDIT.cfg_interval, svc.EDIT.cfg_renorm_type) == (2.0, 0.0, "text_channel")
  assert (svc.UND.max_new_tokens, svc.UND.text_temperature, svc.UND.do_sample) == (512, 0.3, False)
  assert svc.split_thinking("<think> a plan </think> the answer") == ("a plan", "the answer")
  assert svc.split_thinking("just an answer") == ("", "just an answer")


def test_bad_input_is_one_line(tmp_path):
  junk = tmp_path / "junk.png"
  junk.write_text("not an image")
  cases = [(None, "Please upload an image."), (str(junk), "junk.png is not a readable image"),
           (np.zeros((4, 4, 7), np.uint8), "is not an image"), (np.zeros((4, 4, 3), np.float32), "is not an image"),
           ("a string", "is not a readable image")]
  for image, message in cases:
    with pytest.raises(svc.AppInputError, match=message):
      svc.open_image(image)
  for prompt in (None, "", "  \n"):
    with pytest.raises(svc.AppInputError, match="Please enter a prompt"):
      svc.check_prompt(prompt)
  with pytest.raises(svc.AppInputError, match="Image Ratio"):
    svc.ratio_shape("2:1", 1024, 16)
  assert svc.open_image(Image.new("RGBA", (5, 3))).mode == "RGB"


@pytest.fixture(scope="module")
def service():
  from bagel_jax.inference import Inferencer
  return svc.Service(Inferencer.from_checkpoint(FIXTURE_DIR, tokenizer=TOKENIZER))


def test_thinking_controls_follow_upstream(service):
  # Upstream: without Thinking, 1024 think tokens, greedy, temperature 0.3 whatever the controls say.
  off = service._gen_kwargs(svc.T2I.replace(do_sample=True, max_think_token_n=64, text_temperature=0.9), None, {})
  assert (off["think"], off["do_sample"], off["max_think_token_n"], off["text_temperature"]) == (False, False, 1024, 0.3)
  on = service._gen_kwargs(svc.T2I.replace(think=True, do_sample=True, max_think_token_n=64, seed=5), None, {})
  assert (on["do_sample"], on["max_think_token_n"], on["seed"], on["cfg_interval"]) == (True, 64, 5, (0.4, 1.0))
  assert service._gen_kwargs(svc.T2I, None, {})["seed"] > 0  # 0: a random seed
  with pytest.raises(svc.AppInputError, match="CFG Interval"):
    service._gen_kwargs(svc.T2I.replace(cfg_interval=1.5), None, {})


def test_requests_run_one_at_a_time_with_their_own_progress(service):
  """Two users at once: each sees only its own denoising steps, and both get the image one user alone gets."""
  settings = svc.T2I.replace(seed=3, num_timesteps=4)
  alone, _ = service.text_to_image("a red cat", settings, progress=lambda *_: None)
  results, steps = [None, None], [[], []]

  def user(i):
    results[i] = service.text_to_image("a red cat", settings, progress=lambda d, n: steps[i].append((d, n)))[0]

  threads = [threading.Thread(target=user, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert alone.size == (64, 64)
  for i in range(2):
    assert steps[i] == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_array_equal(np.asarray(results[i]), np.asarray(alone))
  thinking, answer = service.understand(alone, "What is this?", svc.UND.replace(max_new_tokens=8))
  assert thinking == "" and isinstance(answer, str)


def fake_shapes_run(workdir):
  """A trainer workdir as `python -m bagel_jax.train --config configs/shapes.py` leaves it (random weights)."""
  import jax.numpy as jnp

  from bagel_jax.api import BagelModel
  from bagel_jax.data import shapes
  from bagel_jax.train.checkpoints import Checkpointer, save_params
  from bagel_jax.train.step import TrainState
  from configs.shapes import get_config

  config = get_config()
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
  (workdir / "vae_stats.json").write_text(json.dumps({"scale_factor": 1.5, "shift_factor": 0.25}))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32) * 0.02),
                        BagelModel(shapes.model_config()).abstract_params())
  save_params(workdir / "vae", params["vae"])
  ema = jax.tree.map(lambda x: x * 0.5, params["bagel"])
  state = TrainState(step=jnp.int32(7), params=params["bagel"], opt_state={"mu": jnp.zeros(3)}, ema=ema,
                     rng=jnp.zeros(2, jnp.uint32), nonfinite_streak=jnp.int32(0), nonfinite_total=jnp.int32(0))
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  ckpt.save(7, state, {}, {}, force=True)
  ckpt.close()
  return params["vae"], ema


def test_the_app_loads_a_training_run(tmp_path):
  from bagel_jax.app.__main__ import SHAPES_PROMPTS, load_service, parser
  from bagel_jax.train.restore import is_run, load_run
  workdir = tmp_path / "shapes"
  vae, ema = fake_shapes_run(workdir)
  assert is_run(workdir) and not is_run(FIXTURE_DIR)
  run = load_run(workdir)
  assert (run.step, run.weights, run.model.cfg.vae.scale_factor, run.model.cfg.vae.shift_factor) == (7, "ema", 1.5, 0.25)
  for got, want in zip(jax.tree.leaves(run.params), jax.tree.leaves({"bagel": ema, "vae": vae})):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  service = load_service(parser().parse_args(["--checkpoint", str(workdir)]))
  assert service.prompts == SHAPES_PROMPTS and "training run, step 7 (ema)" in service.label
  image, _ = service.text_to_image(service.prompts["t2i"], svc.T2I.replace(seed=1, num_timesteps=3))
  assert image.size == (32, 32)
  from bagel_jax.tokenizer import TokenizerError
  with pytest.raises(TokenizerError, match="purple"):
    service.text_to_image("a purple circle", svc.T2I)


def test_cli_refuses_a_missing_checkpoint_in_one_line(capsys, tmp_path):
  from bagel_jax.app.__main__ import main
  assert main(["--checkpoint", str(tmp_path / "nothing"), "--server-port", "1"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "nothing" in err, err
