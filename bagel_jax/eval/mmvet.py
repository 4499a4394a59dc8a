"""MM-Vet (upstream `eval/vlm/eval/mmvet/evaluate_mmvet.py`).

--data: the mm-vet folder (llava-mm-vet.jsonl: question_id, image, text; images/).
--out: OUT/results.json ({"v1_{question_id}": answer}), the file MM-Vet's GPT-4 evaluator reads
(the official evaluator or its Hugging Face space; not included).
Prompt: the question + " " (upstream appends an empty prompt after a space); at most 1000 tokens.
"""

from __future__ import annotations

import pathlib
from typing import Any, ClassVar

from bagel_jax.eval.core import Item, field, require_dir
from bagel_jax.eval.readers import open_image, read_jsonl
from bagel_jax.eval.store import write_json
from bagel_jax.eval.understanding import ChatBenchmark


class MMVet(ChatBenchmark):
  name: ClassVar[str] = "mmvet"
  description: ClassVar[str] = "MM-Vet open answers as results.json (GPT-4 scoring not included)"
  max_new_tokens: ClassVar[int] = 1000

  def load(self) -> list[Item]:
    root = require_dir(self.args.data, "mm-vet")
    rows = read_jsonl(root / "llava-mm-vet.jsonl", "MM-Vet questions (llava-mm-vet.jsonl)")
    return [Item(f"v1_{field(r, 'question_id', f'llava-mm-vet.jsonl:{n + 1}')}",
                 {"image": field(r, "image", f"llava-mm-vet.jsonl:{n + 1}"), "text": field(r, "text", f"llava-mm-vet.jsonl:{n + 1}")})
            for n, r in enumerate(rows)]

  def images(self, item: Item) -> list:
    return [open_image(pathlib.Path(self.args.data) / "images" / item.data["image"])]

  def question(self, item: Item) -> str:
    return item.data["text"] + " "

  def write_outputs(self, done) -> dict[str, Any]:
    write_json(self.out / "results.json", {it.key: rec["response"] for it, rec in done})
    return {}


__all__ = ["MMVet"]
