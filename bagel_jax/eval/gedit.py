"""GEdit-Bench (upstream `eval/gen/gedit/gen_images_gedit.py`, `scripts/eval/run_gedit.sh`).

--data: a snapshot of the Hugging Face dataset `stepfun-ai/GEdit-Bench` (its train Parquet files;
columns task_type, key, instruction, instruction_language, input_image).
--out: OUT/fullset/{task_type}/{language}/{key}.png and {key}_SRCIMG.png (the input), the
`gen_image` folder that GEdit's `test_gedit_score.py --save_path` reads as SAVE_PATH/gen_image.
Scoring (VIEScore with GPT-4.1) is not included.
"""

from __future__ import annotations

import pathlib
from typing import Any, ClassVar

from bagel_jax.eval.core import EvalError, Item, field
from bagel_jax.eval.generation import EditBenchmark, flow_settings
from bagel_jax.eval.readers import image_bytes, open_image, read_parquet_rows
from bagel_jax.eval.store import write_png


class GEdit(EditBenchmark):
  name: ClassVar[str] = "gedit"
  description: ClassVar[str] = "GEdit-Bench edits in OUT/fullset/{task}/{language}/ (VIEScore not included)"
  # gen_images_gedit.py: text CFG 4, image CFG 1.5, interval [0.4, 1], text_channel renorm, renorm_min 0,
  # shift 3, 50 steps; --use_think: plan up to 10240 tokens (not saved), the input is saved beside the edit.
  defaults: ClassVar[dict[str, Any]] = flow_settings(4.0, 1.5, (0.4, 1.0), "text_channel")
  think_tokens: ClassVar[int] = 10240
  crop: ClassVar[bool] = False
  save_think: ClassVar[bool] = False

  @classmethod
  def add_arguments(cls, p) -> None:
    p.add_argument("--language", choices=("all", "en", "cn"), default="all", help="instructions to run (default all)")

  def load(self) -> list[Item]:
    rows = read_parquet_rows(self.args.data, "train", "GEdit-Bench")
    items = []
    for i, row in enumerate(rows):
      where = f"{self.args.data}: row {i}"
      task, key, lang = (str(field(row, k, where)) for k in ("task_type", "key", "instruction_language"))
      if self.args.language not in ("all", lang):
        continue
      items.append(Item(f"{task}/{lang}/{key}", {"task_type": task, "key": key, "language": lang, "_index": i,
                                                 "instruction": field(row, "instruction", where)},
                        {"image": image_bytes(field(row, "input_image", where), where)}))
    if not items:
      raise EvalError(f"{self.args.data}: no GEdit-Bench rows for language {self.args.language!r}")
    return items

  def source_images(self, item: Item) -> list:
    return [open_image(item.blobs["image"], white=True, where=f"GEdit {item.key}")]

  def folder(self, item: Item) -> pathlib.Path:
    return self.out / "fullset" / item.data["task_type"] / item.data["language"]

  def outputs(self, item: Item) -> list[pathlib.Path]:
    return [self.folder(item) / f"{item.data['key']}.png"]

  def is_done(self, item: Item) -> bool:
    return (self.folder(item) / f"{item.data['key']}_SRCIMG.png").is_file() and super().is_done(item)

  def save(self, item, requests, outputs) -> None:
    write_png(self.folder(item) / f"{item.data['key']}_SRCIMG.png", self.source_images(item)[0])
    super().save(item, requests, outputs)


__all__ = ["GEdit"]
