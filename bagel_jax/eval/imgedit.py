"""ImgEdit-Bench single-turn (upstream `eval/gen/gen_images_mp_imgedit.py`, `scripts/eval/run_imgedit.sh`).

--data: the `Benchmark/singleturn` folder; --metadata (default DATA/singleturn.json): a JSON object
{key: {"id": image path under DATA, "prompt": instruction, "edit_type": ...}}.
--out: OUT/{key}.png, the `--result_img_folder` of ImgEdit's `basic_bench.py` (GPT-4o scoring, not included).
"""

from __future__ import annotations

import pathlib
from typing import Any, ClassVar

from bagel_jax.eval.core import EvalError, Item, field, require_dir
from bagel_jax.eval.generation import EditBenchmark, flow_settings
from bagel_jax.eval.readers import open_image, read_json

# gen_images_mp_imgedit.py (the editing code of the KRIS/RISE scripts): text CFG 4, image CFG 1.5,
# interval [0, 1], shift 3, 50 steps, renorm_min 0, text_channel renorm.
EDIT_DEFAULTS: dict[str, Any] = flow_settings(4.0, 1.5, (0.0, 1.0), "text_channel")


class ImgEdit(EditBenchmark):
  name: ClassVar[str] = "imgedit"
  description: ClassVar[str] = "ImgEdit-Bench single-turn edits as OUT/{key}.png (GPT-4o scoring not included)"
  defaults: ClassVar[dict[str, Any]] = EDIT_DEFAULTS

  @classmethod
  def add_arguments(cls, p) -> None:
    p.add_argument("--metadata", default=None, help="singleturn.json (default: DATA/singleturn.json)")

  def load(self) -> list[Item]:
    root = require_dir(self.args.data, "ImgEdit singleturn")
    meta = read_json(self.args.metadata or root / "singleturn.json", "ImgEdit metadata")
    if not isinstance(meta, dict) or not meta:
      raise EvalError(f"{self.args.metadata or root / 'singleturn.json'}: expected a JSON object {{key: entry}}")
    items = []
    for i, (key, row) in enumerate(meta.items()):
      where = f"singleturn.json: entry {key!r}"
      items.append(Item(str(key), {"path": field(row, "id", where), "instruction": field(row, "prompt", where),
                                   "_index": i}))
    return items

  def source_images(self, item: Item) -> list:
    return [open_image(pathlib.Path(self.args.data) / item.data["path"], white=True)]

  def outputs(self, item: Item) -> list[pathlib.Path]:
    return [self.out / f"{item.key}.png"]


__all__ = ["ImgEdit", "EDIT_DEFAULTS"]
