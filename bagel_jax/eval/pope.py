"""POPE (upstream `eval/vlm/eval/pope/evaluate_pope.py` and `eval_pope.py`).

--data: the POPE folder of InternVL's layout: llava_pope_test.jsonl (question_id, image, text,
category), val2014/ (COCO images) and coco/coco_pope_{category}.json (labels, one JSON per line).
--out: OUT/results.json (a list of {"question_id", "text", "text_orig", "metadata"}, the file
`eval_pope.py --result-file` reads), OUT/results.txt and the scores (per category accuracy,
precision, recall, F1, yes ratio; the mean F1) in OUT/summary.json.
--cot: upstream's `pope_cot` variant (the CoT instruction, 1000 tokens, "Final answer:" extracted).
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, ClassVar, Sequence

from bagel_jax.eval.core import EvalError, Item, field, require_dir
from bagel_jax.eval.readers import open_image, read_jsonl
from bagel_jax.eval.store import write_json, write_text
from bagel_jax.eval.understanding import ChatBenchmark

LLAVA_PROMPT = "Answer the question using a single word or phrase."
COT_INSTRUCTION = ("Your task is to answer the question below. "
                   "Give step by step reasoning before you answer, and when you're ready to answer, "
                   "please use the format \"Final answer: ..\"\n\nQuestion:\n\n{question}")


def extract_final_answer(text: str) -> str:
  """Upstream `extract_answer` (CoT): the text after 'Final answer:' or 'Answer:', else all of it."""
  m = re.search(r"(Final answer:|Answer:)\s*(.*)", text, re.IGNORECASE)
  return m.group(2).strip() if m else text


def yes_no(text: str) -> int:
  """eval_pope.py: the first sentence, commas dropped; 'No', 'not' or 'no' as a word -> 0 (no), else 1 (yes)."""
  if "." in text:
    text = text.split(".")[0]
  words = text.replace(",", "").split(" ")
  return 0 if ("No" in words or "not" in words or "no" in words) else 1


def pope_metrics(texts: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """eval_pope.py `eval_pope` for one category: answers and labels paired in order."""
  preds = [yes_no(t) for t in texts]
  gold = [0 if lab == "no" else 1 for lab in labels]
  tp = sum(p == 1 and g == 1 for p, g in zip(preds, gold))
  fp = sum(p == 1 and g == 0 for p, g in zip(preds, gold))
  tn = sum(p == 0 and g == 0 for p, g in zip(preds, gold))
  fn = sum(p == 0 and g == 1 for p, g in zip(preds, gold))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": (tp + tn) / max(1, tp + tn + fp + fn),
          "precision": precision, "recall": recall, "f1": f1, "yes_ratio": preds.count(1) / max(1, len(preds)),
          "samples": len(preds)}


def results_text(scores: dict[str, Any]) -> str:
  """eval_pope.py's results.txt (per category counts and rates, then the mean F1)."""
  msg = ""
  for cat, m in scores.items():
    if cat == "mean_f1":
      continue
    msg += (f"Category: {cat}, # samples: {m['samples']}\nTP\tFP\tTN\tFN\t\n{m['TP']}\t{m['FP']}\t{m['TN']}\t{m['FN']}\n"
            f"Accuracy: {m['accuracy']}\nPrecision: {m['precision']}\nRecall: {m['recall']}\nF1 score: {m['f1']}\n"
            f"Yes ratio: {m['yes_ratio']}\n====================================\n")
  return msg + f"Avg F1 score: {scores['mean_f1']}\n"


class Pope(ChatBenchmark):
  name: ClassVar[str] = "pope"
  description: ClassVar[str] = "POPE object hallucination; accuracy/precision/recall/F1 per category (offline)"
  max_new_tokens: ClassVar[int] = 100

  @classmethod
  def add_arguments(cls, p) -> None:
    p.add_argument("--cot", action="store_true", help="upstream's pope_cot variant")

  def new_tokens(self) -> int:
    return self.args.max_new_tokens or (1000 if self.args.cot else self.max_new_tokens)

  def settings(self) -> dict[str, Any]:
    return {**self.infer_kwargs(), "cot": self.args.cot}

  def load(self) -> list[Item]:
    root = require_dir(self.args.data, "POPE")
    rows = read_jsonl(root / "llava_pope_test.jsonl", "POPE questions (llava_pope_test.jsonl)")
    items = []
    for n, row in enumerate(rows):
      where = f"llava_pope_test.jsonl:{n + 1}"
      q = field(row, "text", where)
      if LLAVA_PROMPT not in q:
        raise EvalError(f"{where}: the question lacks {LLAVA_PROMPT!r}")
      items.append(Item(str(field(row, "question_id", where)), {
          "question_id": row["question_id"], "image": field(row, "image", where), "text": q,
          "category": field(row, "category", where)}))
    return items

  def images(self, item: Item) -> list:
    return [open_image(pathlib.Path(self.args.data) / "val2014" / item.data["image"])]

  def question(self, item: Item) -> str:
    q = item.data["text"].replace(LLAVA_PROMPT, "" if self.args.cot else LLAVA_PROMPT).strip()
    return COT_INSTRUCTION.format(question=q) if self.args.cot else q

  def record(self, item: Item, response: str) -> dict:
    text = extract_final_answer(response).strip() if self.args.cot else response
    return {"question_id": item.data["question_id"], "text": text, "text_orig": response, "metadata": {}}

  def labels(self, category: str) -> list[str]:
    path = pathlib.Path(self.args.data) / "coco" / f"coco_pope_{category}.json"
    return [field(r, "label", str(path)) for r in read_jsonl(path, "POPE labels")]

  def write_outputs(self, done) -> dict[str, Any]:
    results = [{k: rec[k] for k in ("question_id", "text", "text_orig", "metadata")} for _, rec in done]
    write_json(self.out / "results.json", results)
    scores: dict[str, Any] = {}
    for cat in sorted({it.data["category"] for it, _ in done}):
      texts = [rec["text"] for it, rec in done if it.data["category"] == cat]
      scores[cat] = pope_metrics(texts, self.labels(cat)[:len(texts)])
    scores["mean_f1"] = sum(s["f1"] for s in scores.values()) / len(scores)
    write_text(self.out / "results.txt", results_text(scores))
    return scores


__all__ = ["Pope", "pope_metrics", "yes_no", "extract_final_answer"]
