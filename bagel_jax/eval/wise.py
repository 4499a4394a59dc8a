"""WISE (upstream `eval/gen/gen_images_mp_wise.py`, `scripts/eval/run_wise.sh`).

--data: WISE's prompt JSON, a list of {"prompt_id", "Prompt", ...} (upstream `final_data.json`),
or WISE's data folder (its `*.json` files, concatenated in name order).
--out: OUT/{prompt_id}.png (+ OUT/{prompt_id}.txt with the plan under --think), the folder that
WISE's `gpt_eval_mp.py --image_dir` reads.  Scoring needs GPT-4o (not included).
"""

from __future__ import annotations

import pathlib
from typing import Any, ClassVar

from bagel_jax.eval.core import EvalError, Item, field
from bagel_jax.eval.generation import TextToImageBenchmark, flow_settings
from bagel_jax.eval.readers import read_json
from bagel_jax.inference.contexts import CfgContext


class Wise(TextToImageBenchmark):
  name: ClassVar[str] = "wise"
  description: ClassVar[str] = "WISE: one image per prompt as OUT/{prompt_id}.png (GPT-4o scoring not included)"
  # gen_images_mp_wise.py: cfg 4, interval [0.4, 1], shift 3, 50 steps, renorm_min 0, global renorm.
  defaults: ClassVar[dict[str, Any]] = flow_settings(4.0, 1.0, (0.4, 1.0), "global")
  think_tokens: ClassVar[int] = 2048
  # gen_images_mp_wise.py: with --think (`generate_image_with_think`, lines 50-69 and 137-141) the text-CFG
  # branch runs with `cfg_text_past_key_values=None` at the system prompt's kv length and rope: no
  # keys, the position after the system prompt.  Without it (`generate_image`, lines 182-190) an
  # empty context at position 0: the same spec.
  contexts: ClassVar[dict[str, CfgContext]] = {"cfg_text_context": CfgContext(system=True, keys=False)}

  def _rows(self) -> list[dict]:
    data = pathlib.Path(self.args.data)
    if data.is_dir():
      rows = []
      for p in sorted(data.glob("*.json")):
        rows += read_json(p, "WISE prompts")
      return rows
    return read_json(data, "WISE prompts")

  def load(self) -> list[Item]:
    rows = self._rows()
    if not isinstance(rows, list) or not rows:
      raise EvalError(f"{self.args.data}: expected a non-empty JSON list of WISE prompts")
    items = []
    for i, row in enumerate(rows):
      where = f"{self.args.data}: entry {i}"
      items.append(Item(str(field(row, "prompt_id", where)), {"prompt": field(row, "Prompt", where), "_index": i}))
    return items

  def outputs(self, item: Item) -> list[pathlib.Path]:
    return [self.out / f"{item.key}.png"]


__all__ = ["Wise"]
