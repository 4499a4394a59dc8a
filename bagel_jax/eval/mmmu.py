"""MMMU (upstream `eval/vlm/eval/mmmu/evaluate_mmmu.py`, `evaluate_mmmu_cot.py`, `main_eval_only.py`).

--data: a snapshot of the Hugging Face dataset `MMMU/MMMU` ({Subject}/{split}-*.parquet; subjects
in upstream's order, absent ones skipped); --split validation (default), dev or test.
--out: OUT/prediction.json ({id: answer}, the file `main_eval_only.py --output_path` reads),
OUT/results.jsonl, and for the validation split OUT/results.txt with the rule-based scores
(also in OUT/summary.json; --answers takes upstream's answer_dict_val.json instead of the data's answers).
Prompt: question, "\\nA. ..." options, then "Answer with the option's letter from the given choices
directly." or "Answer the question using a single word or phrase."; image_1 is enlarged 2x
(bilinear); at most 10 tokens.  --cot: upstream's CoT variant (its V2 prompts, 16384 tokens,
results.jsonl only: its open answers are judged by GPT-4o upstream).
"""

from __future__ import annotations

import ast
import json
from typing import Any, ClassVar

from bagel_jax.eval.core import EvalError, Item, field, require_dir
from bagel_jax.eval.mmmu_metrics import SUBJECTS, mmmu_scores
from bagel_jax.eval.readers import image_bytes, open_image, read_json, read_parquet_rows
from bagel_jax.eval.store import write_json, write_text
from bagel_jax.eval.understanding import ChatBenchmark, option_letter

PROMPTS = {"multiple-choice": "Answer with the option's letter from the given choices directly.",
           "open": "Answer the question using a single word or phrase."}
_THINK = ("You should first think about the reasoning process in the mind and then provide the user with the answer. "
          "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here "
          "</think> answer here.")
COT_MC = _THINK + "Question: {question} Options: {options} \nAnswer with the option's letter from the given choices directly."
COT_OPEN = _THINK + "{question}\nAnswer the question using a single word or phrase."
LETTERS = "ABCDEFGHIJKLM"


def parse_gold(answer: Any) -> Any:
  """The data's answer: a letter, a string, or a list written as a Python literal."""
  if isinstance(answer, str) and answer.startswith("["):
    try:
      return list(ast.literal_eval(answer))
    except (ValueError, SyntaxError):
      return answer
  return answer


class MMMU(ChatBenchmark):
  name: ClassVar[str] = "mmmu"
  description: ClassVar[str] = "MMMU; prediction.json and rule-based validation scores (offline)"
  max_new_tokens: ClassVar[int] = 10

  @classmethod
  def add_arguments(cls, p) -> None:
    p.add_argument("--split", default="validation", choices=("validation", "dev", "test"))
    p.add_argument("--cot", action="store_true", help="upstream's evaluate_mmmu_cot.py variant")
    p.add_argument("--answers", default=None, help="answer_dict_val.json to score against (default: the data's answers)")

  def new_tokens(self) -> int:
    return self.args.max_new_tokens or (16384 if self.args.cot else self.max_new_tokens)

  def settings(self) -> dict[str, Any]:
    return {**self.infer_kwargs(), "split": self.args.split, "cot": self.args.cot}

  def load(self) -> list[Item]:
    root = require_dir(self.args.data, "MMMU")
    items = []
    for subject in SUBJECTS:
      if not (root / subject).is_dir():
        continue
      for row in read_parquet_rows(root / subject, self.args.split, f"MMMU {subject}"):
        items.append(self._item(row, f"{root / subject}"))
    if not items:
      raise EvalError(f"{root}: no MMMU subject folders with {self.args.split} Parquet files")
    return items

  def _item(self, row: dict, where: str) -> Item:
    ident = str(field(row, "id", where))
    try:
      choices = ast.literal_eval(field(row, "options", where) or "[]")
    except (ValueError, SyntaxError):
      raise EvalError(f"{where}: {ident}: options are not a Python list literal") from None
    options = {LETTERS[i]: str(c).strip() for i, c in enumerate(choices)}
    blobs = {f"image_{k}": image_bytes(row[f"image_{k}"], f"{where}: {ident}")
             for k in range(1, 8) if row.get(f"image_{k}") is not None}
    qtype = field(row, "question_type", where)
    return Item(ident, {"question": self._question(row["question"], options, qtype), "options": options,
                        "question_type": qtype, "answer": row.get("answer")}, blobs)

  def _question(self, question: str, options: dict, qtype: str) -> str:
    choice_txt = "\n".join(f"{k}. {v}" for k, v in options.items())
    if self.args.cot:
      if choice_txt:
        return COT_MC.format(question=question.strip(), options=choice_txt.strip())
      return COT_OPEN.format(question=question.strip())
    question = question.strip()
    if choice_txt:
      question += "\n" + choice_txt
    return (question + "\n" + PROMPTS[qtype if qtype in PROMPTS else "open"]).strip()

  def images(self, item: Item) -> list:
    from PIL import Image
    out = []
    for k in range(1, 8):
      if f"image_{k}" in item.blobs:
        im = open_image(item.blobs[f"image_{k}"], white=True, where=f"MMMU {item.key} image_{k}")
        out.append(im.resize((im.width * 2, im.height * 2), Image.BILINEAR) if k == 1 else im)
    return out

  def question(self, item: Item) -> str:
    return item.data["question"]

  def record(self, item: Item, response: str) -> dict:
    if self.args.cot:
      return {"raw": response, "answer": response.strip()}
    return {"raw": response, "answer": option_letter(response, item.data["options"]) if item.data["options"] else response}

  def write_outputs(self, done) -> dict[str, Any]:
    lines = [{"question": it.data["question"], "answer": rec["answer"], "gt_answers": it.data["answer"],
              "data_id": it.key} for it, rec in done]
    write_text(self.out / "results.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    if self.args.cot:
      return {}
    write_json(self.out / "prediction.json", {it.key: rec["answer"] for it, rec in done}, indent=4)
    if self.args.split != "validation":
      return {}
    gold = read_json(self.args.answers, "MMMU answers") if self.args.answers else None
    entries = []
    for it, rec in done:
      if gold is not None and it.key not in gold:
        raise EvalError(f"{self.args.answers}: no answer for {it.key}")
      g = gold[it.key] if gold is not None else {"question_type": it.data["question_type"],
                                                  "ground_truth": parse_gold(it.data["answer"])}
      entries.append({"id": it.key, "question_type": g["question_type"], "answer": g["ground_truth"],
                      "prediction": rec["answer"]})
    scores = mmmu_scores(entries)
    write_text(self.out / "results.txt", "".join(f"{k}: num={v['num']}, acc={v['acc']}\n" for k, v in scores.items()))
    return scores


__all__ = ["MMMU", "parse_gold"]
