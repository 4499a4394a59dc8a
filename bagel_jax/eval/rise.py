"""RISEBench (upstream `eval/gen/gen_images_mp_rise.py`, `scripts/eval/run_rise.sh`).

--data: RISEBench's `data` folder; --metadata (default DATA/datav2_total_w_subtask.json): a list
of {"index", "category", "instruction", "image" (path under DATA), ...}.
--out: OUT/{category}/{index}.png (+ .txt plan under --think), the `--output` of RISE's `gpt_eval.py`
(GPT-4.1 scoring, not included).
"""

from __future__ import annotations

import pathlib
from typing import Any, ClassVar

from bagel_jax.eval.core import EvalError, Item, field, require_dir
from bagel_jax.eval.generation import EditBenchmark
from bagel_jax.eval.imgedit import EDIT_DEFAULTS
from bagel_jax.eval.readers import open_image, read_json


class Rise(EditBenchmark):
  name: ClassVar[str] = "rise"
  description: ClassVar[str] = "RISEBench edits as OUT/{category}/{index}.png (GPT-4.1 scoring not included)"
  defaults: ClassVar[dict[str, Any]] = {**EDIT_DEFAULTS, "cfg_img_scale": 2.0}  # gen_images_mp_rise.py: 2.0

  @classmethod
  def add_arguments(cls, p) -> None:
    p.add_argument("--metadata", default=None, help="default: DATA/datav2_total_w_subtask.json")

  def load(self) -> list[Item]:
    root = require_dir(self.args.data, "RISEBench data")
    meta = self.args.metadata or root / "datav2_total_w_subtask.json"
    rows = read_json(meta, "RISEBench metadata")
    if not isinstance(rows, list) or not rows:
      raise EvalError(f"{meta}: expected a non-empty JSON list")
    items = []
    for i, row in enumerate(rows):
      where = f"{meta}: entry {i}"
      cat, idx = field(row, "category", where), field(row, "index", where)
      items.append(Item(f"{cat}/{idx}", {"category": cat, "index": str(idx), "image": field(row, "image", where),
                                         "instruction": field(row, "instruction", where), "_index": i}))
    return items

  def source_images(self, item: Item) -> list:
    return [open_image(pathlib.Path(self.args.data) / item.data["image"], white=True)]

  def outputs(self, item: Item) -> list[pathlib.Path]:
    return [self.out / item.data["category"] / f"{item.data['index']}.png"]


__all__ = ["Rise"]
