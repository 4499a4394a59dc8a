"""MME (upstream `eval/vlm/eval/mme/eval.py` and `calculation.py`).

--data: `MME_Benchmark_release_version` (a folder per subtask, images in it or in its images/).
--questions: the question lists of MME's eval tool (`Your_Results/{subtask}.txt`, lines
"image<TAB>question<TAB>yes|no"; upstream ships them in eval/vlm/eval/mme/Your_Results).
--out: OUT/{subtask}.txt with "image<TAB>question<TAB>answer<TAB>response" lines (the eval tool's
format), OUT/results.txt (upstream's calculation), and the scores in OUT/summary.json.
Prompt: question + " Answer the question using a single word or phrase."; at most 20 tokens.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, ClassVar, Sequence

from bagel_jax.eval.core import EvalError, Item, require_dir
from bagel_jax.eval.readers import open_image
from bagel_jax.eval.store import write_text
from bagel_jax.eval.understanding import ChatBenchmark

PROMPT = "Answer the question using a single word or phrase."
EVAL_TYPES = {
    "Perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                   "OCR"],
    "Cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}
_HAN = re.compile(r"[\u4e00-\u9fa5]")


def post_process(response: str) -> str:
  """Upstream `post_processing`: Chinese yes/no mapped, lower-cased, true/false -> yes/no, Han characters dropped."""
  response = response.replace("\n", "").replace("不是", "No").replace("是", "Yes").replace("否", "No")
  response = response.lower().replace("true", "yes").replace("false", "no")
  return _HAN.sub("", response)


def parse_pred(pred: str) -> str:
  """calculation.py `parse_pred_ans`: yes/no, else from the first 4 characters, else 'other'."""
  if pred in ("yes", "no"):
    return pred
  head = pred[:4]
  return "yes" if "yes" in head else "no" if "no" in head else "other"


def subtask_metrics(lines: Sequence[tuple[str, str, str, str]]) -> dict[str, float]:
  """calculation.py for one subtask: lines (image, question, answer, response) in pairs per image.
  acc: share of questions right; acc_plus: share of images with both right; score = 100 (acc + acc_plus)."""
  if len(lines) % 2:
    raise EvalError(f"MME: a subtask has {len(lines)} answers; expected two per image")
  gts = [gt.lower() for _, _, gt, _ in lines]
  if any(g not in ("yes", "no") for g in gts):
    raise EvalError("MME: a ground-truth answer is not yes/no")
  preds = [parse_pred(p.lower()) for _, _, _, p in lines]
  right = [g == p for g, p in zip(gts, preds)]
  acc = sum(right) / len(right)
  acc_plus = sum(right[i] and right[i + 1] for i in range(0, len(right), 2)) / (len(right) // 2)
  return {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus, "other": preds.count("other"),
          "questions": len(right)}


def mme_scores(by_task: dict[str, list]) -> dict[str, Any]:
  """Per subtask metrics and the Perception / Cognition totals (sums of subtask scores) of the subtasks present
  (a subtask with an odd number of answers, i.e. cut by --limit, is listed as incomplete and not scored)."""
  tasks = {t: subtask_metrics(lines) for t, lines in by_task.items() if lines and len(lines) % 2 == 0}
  out: dict[str, Any] = {"subtasks": tasks, "incomplete": sorted(t for t, lines in by_task.items() if len(lines) % 2)}
  for kind, names in EVAL_TYPES.items():
    out[kind] = sum(tasks[t]["score"] for t in names if t in tasks)
  return out


def results_text(scores: dict[str, Any]) -> str:
  """calculation.py's results.txt."""
  msg = ""
  for kind, names in EVAL_TYPES.items():
    msg += f"=========== {kind} ===========\ntotal score: {scores[kind]} \n\n"
    for t in names:
      if t in scores["subtasks"]:
        msg += f"\t {t} score: {scores['subtasks'][t]['score']}\n"
    msg += "\n\n"
  return msg


class MME(ChatBenchmark):
  name: ClassVar[str] = "mme"
  description: ClassVar[str] = "MME yes/no questions; accuracy and accuracy+ per subtask (offline)"
  max_new_tokens: ClassVar[int] = 20

  @classmethod
  def add_arguments(cls, p) -> None:
    p.add_argument("--questions", required=True, help="folder of MME eval-tool question lists ({subtask}.txt)")

  def settings(self) -> dict[str, Any]:
    return {**self.infer_kwargs(), "prompt_suffix": " " + PROMPT}

  def _image(self, task: str, name: str) -> pathlib.Path:
    root = pathlib.Path(self.args.data) / task
    path = root / name
    return path if path.is_file() else root / "images" / name

  def load(self) -> list[Item]:
    qdir = require_dir(self.args.questions, "MME question lists")
    require_dir(self.args.data, "MME_Benchmark_release_version")
    items = []
    for qfile in sorted(qdir.glob("*.txt")):
      task = qfile.stem
      for n, line in enumerate(qfile.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
          continue
        parts = line.strip().split("\t")
        if len(parts) != 3:
          raise EvalError(f"{qfile}:{n + 1}: expected image<TAB>question<TAB>answer")
        if not self._image(task, parts[0]).is_file():
          raise EvalError(f"{self._image(task, parts[0])}: image of {qfile.name}:{n + 1} not found")
        items.append(Item(f"{task}/{n:05d}", {"task": task, "image": parts[0], "question": parts[1], "answer": parts[2]}))
    if not items:
      raise EvalError(f"{qdir}: no question lists ({{subtask}}.txt)")
    return items

  def images(self, item: Item) -> list:
    return [open_image(self._image(item.data["task"], item.data["image"]))]

  def question(self, item: Item) -> str:
    return item.data["question"] + " " + PROMPT

  def record(self, item: Item, response: str) -> dict:
    return {"raw": response, "response": post_process(response)}

  def write_outputs(self, done) -> dict[str, Any]:
    by_task: dict[str, list] = {}
    for it, rec in done:
      d = it.data
      by_task.setdefault(d["task"], []).append((d["image"], d["question"] + " " + PROMPT, d["answer"], rec["response"]))
    for task, lines in by_task.items():
      write_text(self.out / f"{task}.txt", "".join("\t".join(x) + "\n" for x in lines))
    scores = mme_scores(by_task)
    write_text(self.out / "results.txt", results_text(scores))
    return scores


__all__ = ["MME", "post_process", "parse_pred", "subtask_metrics", "mme_scores"]
