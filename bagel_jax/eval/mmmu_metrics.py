"""MMMU's rule-based answer checking (MMMU's `eval_utils.py`, as upstream's `main_eval_only.py` applies
it): multiple choice by exact letter, open answers parsed into candidate strings and numbers."""

from __future__ import annotations

import re
from typing import Any, Sequence

DOMAINS = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": ["Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"],
}
# upstream's subject order (CAT_SHORT2LONG)
SUBJECTS = ["Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory", "Basic_Medical_Science",
            "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design",
            "Diagnostics_and_Laboratory_Medicine", "Economics", "Electronics", "Energy_and_Power", "Finance",
            "Geography", "History", "Literature", "Manage", "Marketing", "Materials", "Math", "Mechanical_Engineering",
            "Music", "Pharmacy", "Physics", "Psychology", "Public_Health", "Sociology"]

_COMMAS = r"-?\b\d{1,3}(?:,\d{3})+\b"
_SCIENTIFIC = r"-?\d+(?:\.\d+)?[eE][+-]?\d+"
_SIMPLE = r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"
_KEYS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]


def is_number(text: str) -> bool:
  try:
    float(text.replace(",", ""))
    return True
  except ValueError:
    return False


def normalize(text: str) -> list:
  """A number -> [float rounded to 2 places]; else the lower-cased string (a single character is
  padded with a space on either side, to avoid trivial matches)."""
  text = text.strip()
  if is_number(text):
    return [round(float(text.replace(",", "")), 2)]
  text = text.lower()
  return [" " + text, text + " "] if len(text) == 1 else [text]


def extract_numbers(text: str) -> list[str]:
  return re.findall(_COMMAS, text) + re.findall(_SCIENTIFIC, text) + re.findall(_SIMPLE, text)


def _key_responses(response: str) -> list[str]:
  """The shortest tail after an indicator ('is ', 'so ', ...; '=' in the last sentence) of each sentence."""
  response = response.strip().strip(".").lower()
  sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
  keys = list(_KEYS)
  found = []
  for i, sent in enumerate(sentences):
    if i == len(sentences) - 1:
      keys.append("=")
    shortest = None
    for k in keys:
      if k in sent:
        tail = sent.split(k)[-1].strip()
        if not shortest or len(tail) < len(shortest):
          shortest = tail
    if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
      found.append(shortest)
  return found or [response]


def parse_open_response(response: str) -> list:
  """Candidate answers of a free-form response: key phrases, the numbers in them, normalized, deduplicated."""
  keys = _key_responses(response)
  cands = keys + [n for k in keys for n in extract_numbers(k)]
  return list({v for c in cands for v in normalize(c)})


def eval_open(gold: Any, parsed: Sequence) -> bool:
  golds = [v for g in (gold if isinstance(gold, list) else [gold]) for v in normalize(str(g))]
  for pred in parsed:
    if isinstance(pred, str):
      if any(isinstance(g, str) and g in pred for g in golds):
        return True
    elif pred in golds:
      return True
  return False


def eval_multi_choice(gold: Any, pred: str) -> bool:
  return pred in gold if isinstance(gold, list) else pred == gold


def mmmu_scores(entries: Sequence[dict]) -> dict[str, Any]:
  """entries: {"id" (validation_{Subject}_{n}), "question_type", "answer", "prediction"}.
  Returns per subject, per domain and overall accuracy (`main_eval_only.py`)."""
  by_subject: dict[str, list[bool]] = {}
  for e in entries:
    subject = "_".join(e["id"].split("_")[1:-1])
    if e["question_type"] == "multiple-choice":
      ok = eval_multi_choice(e["answer"], e["prediction"])
    else:
      ok = eval_open(e["answer"], parse_open_response(e["prediction"]))
    by_subject.setdefault(subject, []).append(ok)
  out: dict[str, Any] = {}
  for domain, subjects in DOMAINS.items():
    vals = [v for s in subjects for v in by_subject.get(s, [])]
    out["Overall-" + domain] = {"num": len(vals), "acc": round(sum(vals) / len(vals), 3) if vals else 0}
    for s in subjects:
      if s in by_subject:
        out[s] = {"num": len(by_subject[s]), "acc": round(sum(by_subject[s]) / len(by_subject[s]), 3)}
  vals = [v for vs in by_subject.values() for v in vs]
  out["Overall"] = {"num": len(vals), "acc": round(sum(vals) / len(vals), 3) if vals else 0}
  return out


__all__ = ["SUBJECTS", "DOMAINS", "normalize", "extract_numbers", "parse_open_response", "eval_open",
           "eval_multi_choice", "mmmu_scores"]
