"""KRIS-Bench (upstream `eval/gen/gen_images_mp_kris.py`, `scripts/eval/run_kris.sh`).

--data: the `KRIS_Bench` folder ({category}/annotation.json and its images).  The entries are
upstream's `final_data.json` when given as --metadata (a list of {"id", "type", "ori_img", "ins_en"}),
else every category's annotation.json ({id: {"ori_img", "ins_en", ...}}), categories in name order.
--out: OUT/{type}/{id}.png (+ .txt plan under --think): upstream writes to RESULTS/bagel and KRIS's
`metrics_*.py --results_dir RESULTS` read RESULTS/bagel/{type}/{id}.png, so pass --out RESULTS/bagel.
"""

from __future__ import annotations

import pathlib
from typing import Any, ClassVar

from bagel_jax.eval.core import EvalError, Item, field, require_dir
from bagel_jax.eval.generation import EditBenchmark
from bagel_jax.eval.imgedit import EDIT_DEFAULTS
from bagel_jax.eval.readers import open_image, read_json


class Kris(EditBenchmark):
  name: ClassVar[str] = "kris"
  description: ClassVar[str] = "KRIS-Bench edits as OUT/{type}/{id}.png (GPT-4o scoring not included)"
  defaults: ClassVar[dict[str, Any]] = EDIT_DEFAULTS  # run_kris.sh: cfg_img 1.5; upstream's script adds --think

  @classmethod
  def add_arguments(cls, p) -> None:
    p.add_argument("--metadata", default=None, help="upstream's final_data.json (default: DATA/*/annotation.json)")

  def _rows(self, root: pathlib.Path) -> list[dict]:
    if self.args.metadata:
      return read_json(self.args.metadata, "KRIS metadata")
    rows = []
    for ann in sorted(root.glob("*/annotation.json")):
      entries = read_json(ann, "KRIS annotation")
      if not isinstance(entries, dict):
        raise EvalError(f"{ann}: expected a JSON object {{id: entry}}")
      rows += [{**e, "id": k, "type": ann.parent.name} for k, e in entries.items()]
    return rows

  def load(self) -> list[Item]:
    root = require_dir(self.args.data, "KRIS_Bench")
    rows = self._rows(root)
    if not isinstance(rows, list) or not rows:
      raise EvalError(f"{self.args.metadata or root}: no KRIS entries (expected {{category}}/annotation.json)")
    items = []
    for i, row in enumerate(rows):
      where = f"KRIS entry {i}"
      kind, ident, imgs = field(row, "type", where), field(row, "id", where), field(row, "ori_img", where)
      items.append(Item(f"{kind}/{ident}", {"type": kind, "id": str(ident), "_index": i,
                                            "images": [imgs] if isinstance(imgs, str) else list(imgs),
                                            "instruction": field(row, "ins_en", where)}))
    return items

  def source_images(self, item: Item) -> list:
    root = pathlib.Path(self.args.data) / item.data["type"]
    return [open_image(root / p, white=True) for p in item.data["images"]]

  def outputs(self, item: Item) -> list[pathlib.Path]:
    return [self.out / item.data["type"] / f"{item.data['id']}.png"]


__all__ = ["Kris"]
