"""MMVP (upstream `eval/vlm/eval/mmvp/evaluate_mmvp.py`).

--data: the MMVP folder (Questions.csv with Index (or the typo 'lndex'), Question, Options "(a) .. (b) ..",
Correct Answer; "MMVP Images/{index}.jpg").
--out: OUT/results.jsonl ({question, answer, gt_answers, data_id}), OUT/results.txt and the
pair accuracy (both questions of an image pair right, upstream's rule) in OUT/summary.json.
Prompt: question, "\\nA. ..\\nB. ..", "\\nAnswer with the option's letter from the given choices
directly."; at most 100 tokens.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, ClassVar, Sequence

from bagel_jax.eval.core import EvalError, Item, field, require_dir
from bagel_jax.eval.readers import open_image, read_table
from bagel_jax.eval.store import write_text
from bagel_jax.eval.understanding import ChatBenchmark, option_letter

PROMPT = "Answer with the option's letter from the given choices directly."


def pair_accuracy(answers: Sequence[str], golds: Sequence[str]) -> float:
  """Consecutive questions form pairs; a pair counts when both are right (an odd last one is dropped)."""
  pairs = len(answers) // 2
  ok = sum(answers[2 * i] == golds[2 * i] and answers[2 * i + 1] == golds[2 * i + 1] for i in range(pairs))
  return ok / pairs if pairs else 0.0


class MMVP(ChatBenchmark):
  name: ClassVar[str] = "mmvp"
  description: ClassVar[str] = "MMVP pairs of questions; pair accuracy (offline)"
  max_new_tokens: ClassVar[int] = 100

  def load(self) -> list[Item]:
    root = require_dir(self.args.data, "MMVP")
    items = []
    for n, row in enumerate(read_table(root / "Questions.csv", ",", "MMVP Questions.csv")):
      where = f"{root / 'Questions.csv'}: row {n + 2}"
      ident = row.get("lndex") or field(row, "Index", where)
      parts = field(row, "Options", where).split("(b)")
      if len(parts) != 2:
        raise EvalError(f"{where}: Options must read '(a) ... (b) ...'")
      options = {"A": parts[0].replace("(a)", "").strip(), "B": parts[1].replace("(b)", "").strip()}
      gold = field(row, "Correct Answer", where)
      for a, b in (("(a)", "A"), ("(b)", "B"), ("(c)", "C"), ("(d)", "D")):
        gold = gold.replace(a, b)
      q = field(row, "Question", where) + "".join(f"\n{k}. {v}" for k, v in options.items()) + "\n" + PROMPT
      items.append(Item(str(ident), {"question": q, "options": options, "answer": gold}))
    return items

  def images(self, item: Item) -> list:
    return [open_image(pathlib.Path(self.args.data) / "MMVP Images" / f"{item.key}.jpg")]

  def question(self, item: Item) -> str:
    return item.data["question"]

  def record(self, item: Item, response: str) -> dict:
    return {"raw": response, "answer": option_letter(response, item.data["options"], empty=None)}

  def write_outputs(self, done) -> dict[str, Any]:
    lines = [{"question": it.data["question"], "answer": rec["answer"], "gt_answers": it.data["answer"],
              "data_id": it.key} for it, rec in done]
    write_text(self.out / "results.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    acc = pair_accuracy([x["answer"] for x in lines], [x["gt_answers"] for x in lines])
    write_text(self.out / "results.txt", f"The accuracy is {acc}")
    return {"pair_accuracy": acc, "pairs": len(lines) // 2}


__all__ = ["MMVP", "pair_accuracy"]
