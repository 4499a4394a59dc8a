"""The README's main command, shortened: `python -m bagel_jax.train --config configs/shapes.py` runs
every stage (TFDS build, VAE stage, training, evaluation) and writes every promised output.

The accuracy bars (>= 90% understanding, >= 80% generation) need the full 13-minute run; its
measured figures are in the README. Here the run is a few steps long, so only the plumbing and
the evaluator's read-back of real images (`analyser_accuracy_on_real_images`) are checked.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from PIL import Image

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_shapes_demo_end_to_end(tmp_path):
  data = tmp_path / "tfds"
  work = tmp_path / "run"
  args = ["--config", "configs/shapes.py", "--workdir", str(work),
          f"--config.data.groups.t2i.data_dir={data}", f"--config.data.groups.qa.data_dir={data}",
          "--config.train.steps=4", "--config.optim.warmup_steps=1", "--config.train.log_every=2", "--config.train.save_every=2",
          "--config.vae_stage.steps=3", "--config.vae_stage.stats_images=64",
          "--config.eval.gen_prompts_per_combo=1", "--config.eval.und_images=8", "--config.eval.num_steps=2"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on the user's machine
  r = subprocess.run([sys.executable, "-m", "bagel_jax.train", *args], cwd=REPO, capture_output=True, text=True,
                     timeout=600, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads((work / "result.json").read_text())
  ev = result["eval"]
  assert ev["gen_images"] == 9 and ev["und_questions"] >= 24
  assert 0.0 <= ev["gen_accuracy"] <= 1.0 and 0.0 <= ev["und_accuracy"] <= 1.0
  assert ev["analyser_accuracy_on_real_images"] == 1.0  # the read-back is right on rendered images
  assert json.loads((work / "eval" / "metrics.json").read_text()) == ev
  with Image.open(work / "eval" / "samples.png") as im:
    assert im.size == (3 * 34 * 4, 3 * 34 * 4)  # 9 images of 32 px (+2 px gaps), 3 per row, scaled 4x
  steps = [json.loads(ln)["step"] for ln in (work / "metrics.jsonl").read_text().splitlines()]
  assert steps == [2, 4]
  assert list((work / "tb").glob("events.out.tfevents.*"))
  assert (work / "checkpoints" / "4").is_dir() and (work / "vae_stats.json").is_file()
  assert json.loads(r.stdout[r.stdout.rindex("{\n"):]) == ev  # the CLI ends by printing the evaluation
