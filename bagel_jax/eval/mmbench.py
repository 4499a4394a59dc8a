"""MMBench (upstream `eval/vlm/eval/mmbench/evaluate_mmbench.py`).

--data: an MMBench TSV (e.g. mmbench_dev_20230712.tsv: index, question, hint, A..E, answer,
category, l2-category, image (base64), source, comment, split).  Missing cells are pandas' NA strings.
--out: OUT/results.xlsx (upstream's submission file: the TSV without hint, category, source, image,
comment, l2-category, with a `prediction` column inserted 7th), and, where the TSV has answers,
the scores in OUT/summary.json: circular evaluation (a question counts only if every circular
variant, index % 1_000_000, is answered right), per category too, and the plain accuracy.
Prompt: [hint\\n]question\\nA. ..\\nB. ..\\n + "Answer with the option's letter from the given choices
directly." (Chinese prompt for *_cn files or --language cn); at most 100 tokens.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, ClassVar

from bagel_jax.eval.core import EvalError, Item, field
from bagel_jax.eval.readers import open_image, read_table
from bagel_jax.eval.store import atomic_write
from bagel_jax.eval.understanding import ChatBenchmark, option_letter
from bagel_jax.eval.xlsx import write_xlsx

PROMPTS = {"en": "Answer with the option's letter from the given choices directly.", "cn": "请直接回答选项字母。"}
OPTIONS = ("A", "B", "C", "D", "E")
DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
CIRCULAR = 1_000_000


def circular_scores(rows: list[dict]) -> dict[str, Any]:
  """rows: {"index", "prediction", "answer", "category"}. A question (index % 1e6) is right only when
  all its circular variants are; also per category and the plain accuracy of the original questions."""
  groups: dict[int, list[dict]] = {}
  for r in rows:
    groups.setdefault(int(r["index"]) % CIRCULAR, []).append(r)
  right = {g: all(r["prediction"] == r["answer"] for r in rs) for g, rs in groups.items()}
  cats: dict[str, list[bool]] = {}
  for g, rs in groups.items():
    cats.setdefault(rs[0].get("category") or "", []).append(right[g])
  orig = [r["prediction"] == r["answer"] for r in rows if int(r["index"]) < CIRCULAR]
  return {"circular_accuracy": sum(right.values()) / len(right), "questions": len(right),
          "per_category": {c: sum(v) / len(v) for c, v in sorted(cats.items())},
          "vanilla_accuracy": sum(orig) / len(orig) if orig else None}


class MMBench(ChatBenchmark):
  name: ClassVar[str] = "mmbench"
  description: ClassVar[str] = "MMBench multiple choice; results.xlsx for the server, circular accuracy offline"
  max_new_tokens: ClassVar[int] = 100

  @classmethod
  def add_arguments(cls, p) -> None:
    p.add_argument("--language", choices=("en", "cn"), default=None, help="prompt language (default: cn for *_cn_* files)")

  def language(self) -> str:
    return self.args.language or ("cn" if "_cn" in str(self.args.data) else "en")

  def settings(self) -> dict[str, Any]:
    return {**self.infer_kwargs(), "prompt": PROMPTS[self.language()]}

  def load(self) -> list[Item]:
    self.rows = read_table(self.args.data, "\t", "MMBench TSV")
    self.header = list(self.rows[0].keys()) if self.rows else []
    items = []
    for n, row in enumerate(self.rows):
      where = f"{self.args.data}: row {n + 2}"
      idx = field(row, "index", where)
      options = {k: row[k] for k in OPTIONS if row.get(k) is not None}
      q = field(row, "question", where)
      if row.get("hint") is not None:
        q = row["hint"] + "\n" + q
      q += "".join(f"\n{k}. {v}" for k, v in options.items()) + "\n" + PROMPTS[self.language()]
      items.append(Item(str(idx), {"index": int(idx), "question": q, "options": options, "answer": row.get("answer"),
                                   "category": row.get("category")}, {"image": field(row, "image", where)}))
    return items

  def images(self, item: Item) -> list:
    try:
      data = base64.b64decode(item.blobs["image"], validate=False)
    except (binascii.Error, ValueError):
      raise EvalError(f"{self.args.data}: index {item.key}: the image is not base64") from None
    return [open_image(data, where=f"{self.args.data}: index {item.key}")]

  def question(self, item: Item) -> str:
    return item.data["question"]

  def record(self, item: Item, response: str) -> dict:
    return {"raw": response, "prediction": option_letter(response, item.data["options"])}

  def write_outputs(self, done) -> dict[str, Any]:
    pred = {it.key: rec["prediction"] for it, rec in done}
    cols = [c for c in self.header if c not in DROPPED]
    cols.insert(min(6, len(cols)), "prediction")
    table = [[pred.get(str(r["index"])) if c == "prediction" else _cell(r.get(c)) for c in cols] for r in self.rows]
    atomic_write(self.out / "results.xlsx", lambda p: write_xlsx(p, cols, table))
    scored = [{"index": it.data["index"], "prediction": rec["prediction"], "answer": it.data["answer"],
               "category": it.data["category"]} for it, rec in done if it.data["answer"] is not None]
    return circular_scores(scored) if scored else {}


def _cell(v):
  """Numbers as numbers (pandas would have parsed them), text as text."""
  if v is None:
    return None
  try:
    return int(v)
  except ValueError:
    return v


__all__ = ["MMBench", "circular_scores"]
