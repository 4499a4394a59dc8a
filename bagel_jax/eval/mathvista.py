"""MathVista (upstream `eval/vlm/eval/mathvista/evaluate_mathvista.py`).

--data: a snapshot of the Hugging Face dataset `AI4Math/MathVista` (data/{split}-*.parquet with
pid, query, decoded_image, ...); --split testmini (default) or test.
--out: OUT/results.json ({pid: the data entry without its image, plus "response"}), the
`--output_file` of upstream's `extract_answer_mp.py` (answer extraction by GPT-4o with the few-shot
prompt of MathVista's ext_ans.py) and `calculate_score.py` (not included).
Prompt: the data's `query` (--cot: upstream's CoT instruction around it); at most 4096 tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

from bagel_jax.eval.core import Item, field
from bagel_jax.eval.pope import COT_INSTRUCTION
from bagel_jax.eval.readers import image_bytes, open_image, read_parquet_rows
from bagel_jax.eval.store import write_json
from bagel_jax.eval.understanding import ChatBenchmark


class MathVista(ChatBenchmark):
  name: ClassVar[str] = "mathvista"
  description: ClassVar[str] = "MathVista responses as results.json (GPT answer extraction not included)"
  max_new_tokens: ClassVar[int] = 4096

  @classmethod
  def add_arguments(cls, p) -> None:
    p.add_argument("--split", default="testmini", choices=("testmini", "test"))
    p.add_argument("--cot", action="store_true", help="upstream's --cot: the CoT instruction around the query")

  def settings(self) -> dict[str, Any]:
    return {**self.infer_kwargs(), "split": self.args.split, "cot": self.args.cot}

  def load(self) -> list[Item]:
    items = []
    for n, row in enumerate(read_parquet_rows(self.args.data, self.args.split, "MathVista")):
      where = f"{self.args.data}: {self.args.split} row {n}"
      entry = {k: v for k, v in row.items() if k != "decoded_image"}
      field(entry, "query", where)
      items.append(Item(str(field(entry, "pid", where)), entry,
                        {"image": image_bytes(field(row, "decoded_image", where), where)}))
    return items

  def images(self, item: Item) -> list:
    return [open_image(item.blobs["image"], where=f"MathVista pid {item.key}")]

  def question(self, item: Item) -> str:
    q = item.data["query"]
    return COT_INSTRUCTION.format(question=q) if self.args.cot else q

  def write_outputs(self, done) -> dict[str, Any]:
    write_json(self.out / "results.json", {it.key: {**it.data, "response": rec["response"]} for it, rec in done},
               indent=4, default=str)
    return {}


__all__ = ["MathVista"]
