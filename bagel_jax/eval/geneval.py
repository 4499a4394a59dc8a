"""GenEval (upstream `eval/gen/gen_images_mp.py`, `scripts/eval/run_geneval.sh`).

--data: the prompt metadata JSON lines (`evaluation_metadata.jsonl`, or upstream's rewritten
`evaluation_metadata_long.jsonl`): one {"tag", "include", "prompt", ...} per line.
--out: OUT/{index:05d}/metadata.jsonl (the line as json.dump writes it) and
OUT/{index:05d}/samples/{k:04d}.png for k < --num-images, the layout GenEval's
`evaluation/evaluate_images.py` reads.  Scoring needs GenEval's object detector (not included).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, ClassVar

from bagel_jax.eval.core import EvalError, Item, field
from bagel_jax.eval.generation import TextToImageBenchmark, flow_settings
from bagel_jax.eval.readers import read_jsonl
from bagel_jax.eval.store import write_text


class GenEval(TextToImageBenchmark):
  name: ClassVar[str] = "geneval"
  description: ClassVar[str] = "GenEval: several images per prompt in OUT/{index:05d}/samples/ (detector scoring not included)"
  # gen_images_mp.py: cfg_scale 4 (text), interval [0, 1], shift 3, 50 steps, renorm_min 0, global renorm, no image CFG.
  defaults: ClassVar[dict[str, Any]] = flow_settings(4.0, 1.0, (0.0, 1.0), "global")

  @classmethod
  def add_arguments(cls, p) -> None:
    p.add_argument("--num-images", type=int, default=4, help="samples per prompt (run_geneval.sh: 4)")

  def settings(self) -> dict[str, Any]:
    return {**self.infer_kwargs(), "resolution": self.side(), "num_images": self.args.num_images}

  def load(self) -> list[Item]:
    if self.args.num_images < 1:
      raise EvalError(f"--num-images must be at least 1; got {self.args.num_images}")
    rows = read_jsonl(self.args.data, "GenEval metadata")
    for n, row in enumerate(rows, 1):
      field(row, "prompt", f"{self.args.data}:{n}")
    return [Item(f"{i:05d}", {**row, "_index": i}) for i, row in enumerate(rows)]

  def folder(self, item: Item) -> pathlib.Path:
    return self.out / item.key

  def outputs(self, item: Item) -> list[pathlib.Path]:
    return [self.folder(item) / "samples" / f"{k:04d}.png" for k in range(self.args.num_images)]

  def is_done(self, item: Item) -> bool:
    return (self.folder(item) / "metadata.jsonl").is_file() and super().is_done(item)

  def save(self, item, requests, outputs) -> None:
    meta = {k: v for k, v in item.data.items() if k != "_index"}
    if not (self.folder(item) / "metadata.jsonl").is_file():
      write_text(self.folder(item) / "metadata.jsonl", json.dumps(meta))
    super().save(item, requests, outputs)


__all__ = ["GenEval"]
