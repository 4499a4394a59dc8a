"""VQA family (upstream `eval/vlm/eval/vqa/evaluate_vqa.py`, InternVL's formats).

--data: the test JSON lines of one dataset ({"image", "question", "question_id", "answer"?}), e.g.
textvqa_val.jsonl; --dataset names it (its prompt, token limit, output fields and metric);
--image-root: the folder image paths are relative to (default: the JSON lines' folder; for
InternVL's layout, where paths start with data/..., pass its eval/vlm folder).
--out: OUT/results.json (a list in upstream's fields for the dataset), OUT/results.txt and the
score in OUT/summary.json: VQA accuracy with the standard answer normalisation (needs
--annotation, the official annotations JSON), relaxed accuracy (ChartQA), exact match (OCR-VQA,
AI2D; GQA's official script is not included, exact match is reported) or ANLS (DocVQA/InfoVQA).
Prompt: question + " Answer the question using a single word or phrase." (VizWiz prepends
"When the provided information is insufficient, respond with 'Unanswerable'. "; AI2D: no prompt).
"""

from __future__ import annotations

import pathlib
from typing import Any, ClassVar

from bagel_jax.eval.core import EvalError, Item, field
from bagel_jax.eval.readers import open_image, read_json, read_jsonl
from bagel_jax.eval.store import write_json, write_text
from bagel_jax.eval.understanding import ChatBenchmark
from bagel_jax.eval.vqa_metrics import anls, exact_match_accuracy, relaxed_accuracy, vqa_accuracy

BASE_PROMPT = "Answer the question using a single word or phrase."
VIZWIZ_PROMPT = "When the provided information is insufficient, respond with 'Unanswerable'. "
# name: (metric, max_new_tokens, output fields)
DATASETS = {
    "vqav2_val": ("vqa_score", 10, "qid"), "vqav2_testdev": (None, 10, "qid"), "okvqa_val": ("vqa_score", 10, "qid"),
    "textvqa_val": ("vqa_score", 10, "qid"), "textvqa_val_ocr": ("vqa_score", 10, "qid"),
    "vizwiz_val": ("vqa_score", 10, "qid"), "vizwiz_test": (None, 10, "vizwiz_test"),
    "docvqa_val": ("anls", 100, "qId"), "docvqa_test": (None, 100, "docvqa_test"),
    "infographicsvqa_val": ("anls", 100, "qId"), "infographicsvqa_test": (None, 100, "qId"),
    "chartqa_test_human": ("relaxed_accuracy", 100, "chartqa"),
    "chartqa_test_augmented": ("relaxed_accuracy", 100, "chartqa"),
    "gqa_testdev": ("accuracy", 10, "qId"), "gqa_testdev_llava": ("accuracy", 10, "qId"),
    "ocrvqa_val": ("accuracy", 100, "qId"), "ocrvqa_test": ("accuracy", 100, "qId"),
    "ai2diagram_test": ("accuracy", 10, "ai2d"),
}


def prompt_for(dataset: str) -> str:
  if "vizwiz" in dataset:
    return VIZWIZ_PROMPT + BASE_PROMPT
  return "" if "ai2d" in dataset else BASE_PROMPT


def output_record(kind: str, question: str, qid: Any, answer: str, annotation: Any) -> dict:
  """The fields upstream writes for the dataset (what each official scorer reads)."""
  if kind == "qid":
    return {"question": question, "question_id": qid, "answer": answer}
  if kind == "qId":
    return {"question": question, "questionId": qid, "answer": answer, "annotation": annotation}
  if kind == "ai2d":
    return {"question": question, "image": qid, "answer": answer, "annotation": annotation}
  if kind == "chartqa":
    return {"question": question, "answer": answer, "annotation": annotation}
  if kind == "docvqa_test":
    return {"questionId": qid, "answer": answer}
  return {"image": str(qid).replace("data/vizwiz/test/", ""), "answer": answer}


class VQA(ChatBenchmark):
  name: ClassVar[str] = "vqa"
  description: ClassVar[str] = "VQA datasets (VQAv2, TextVQA, OK-VQA, VizWiz, GQA, DocVQA, ChartQA, ...); offline scores"

  @classmethod
  def add_arguments(cls, p) -> None:
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--image-root", default=None, help="folder the image paths are relative to")
    p.add_argument("--annotation", default=None, help="official annotations JSON (VQA accuracy datasets)")

  def spec(self) -> tuple:
    return DATASETS[self.args.dataset]

  def new_tokens(self) -> int:
    return self.args.max_new_tokens or self.spec()[1]

  def settings(self) -> dict[str, Any]:
    return {**self.infer_kwargs(), "dataset": self.args.dataset, "prompt": prompt_for(self.args.dataset)}

  def load(self) -> list[Item]:
    rows = read_jsonl(self.args.data, "VQA questions")
    items = []
    for n, r in enumerate(rows):
      where = f"{self.args.data}:{n + 1}"
      items.append(Item(f"{n:07d}", {"image": field(r, "image", where), "question": field(r, "question", where),
                                      "question_id": field(r, "question_id", where), "answer": r.get("answer")}))
    return items

  def root(self) -> pathlib.Path:
    return pathlib.Path(self.args.image_root) if self.args.image_root else pathlib.Path(self.args.data).parent

  def images(self, item: Item) -> list:
    return [open_image(self.root() / item.data["image"])]

  def question(self, item: Item) -> str:
    p = prompt_for(self.args.dataset)
    return item.data["question"] + " " + p if p else item.data["question"]

  def write_outputs(self, done) -> dict[str, Any]:
    metric, _, kind = self.spec()
    out = [output_record(kind, self.question(it), it.data["question_id"], rec["response"], it.data["answer"])
           for it, rec in done]
    write_json(self.out / "results.json", out, ensure_ascii=False)
    preds = [rec["response"] for _, rec in done]
    golds = [it.data["answer"] for it, _ in done]
    if metric == "vqa_score":
      if not self.args.annotation:
        return {}
      score = {"vqa_score": vqa_accuracy(preds, self._human_answers([it.data["question_id"] for it, _ in done]))}
    elif metric is None or any(g is None for g in golds):
      return {}
    else:
      fn = {"anls": anls, "relaxed_accuracy": relaxed_accuracy, "accuracy": exact_match_accuracy}[metric]
      score = {metric: fn(preds, golds)}
    write_text(self.out / "results.txt", f"{score}\n")
    return {**score, "questions": len(preds)}

  def _human_answers(self, qids: list) -> list[list[str]]:
    ann = read_json(self.args.annotation, "VQA annotations")
    try:
      table = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in ann["annotations"]}
    except (KeyError, TypeError):
      raise EvalError(f"{self.args.annotation}: expected {{'annotations': [{{'question_id', 'answers': [{{'answer'}}]}}]}}") from None
    missing = [q for q in qids if q not in table]
    if missing:
      raise EvalError(f"{self.args.annotation}: no annotation for question_id {missing[0]!r}")
    return [table[q] for q in qids]


__all__ = ["VQA", "DATASETS", "prompt_for", "output_record"]
