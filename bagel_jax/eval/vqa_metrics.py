"""VQA metrics of upstream's `eval/vlm/eval/vqa` (InternVL's): the VQA accuracy with EvalAI's
standard answer normalisation (TextVQA/VQAv2/OK-VQA/VizWiz), ChartQA's relaxed accuracy, exact
match, and ANLS (DocVQA/InfographicVQA)."""

from __future__ import annotations

import re
from typing import Sequence

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _punctuation(text: str) -> str:
  out = text
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  # EvalAI passes re.UNICODE as `count` here (a historical slip): at most 32 periods are removed.
  return _PERIOD_STRIP.sub("", out, re.UNICODE)


def _digits_articles(text: str) -> str:
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
  return " ".join(words)


def normalize_answer(answer: str) -> str:
  """EvalAI's VQA answer processing: lower case, punctuation, number words, articles, contractions."""
  answer = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return _digits_articles(_punctuation(answer))


def answer_scores(gt_answers: Sequence[str]) -> dict[str, float]:
  """The soft score of each distinct human answer: mean over the 10 leave-one-out subsets of min(1, matches / 3)."""
  answers = [normalize_answer(a) for a in gt_answers]
  scores = {}
  for cand in set(answers):
    accs = [min(1.0, sum(1 for j, a in enumerate(answers) if j != i and a == cand) / 3) for i in range(len(answers))]
    scores[cand] = sum(accs) / len(accs)
  return scores


def vqa_accuracy(preds: Sequence[str], gts: Sequence[Sequence[str]]) -> float:
  """Mean VQA accuracy (`TextVQAAccuracyEvaluator`): each prediction's score among its 10 human answers."""
  scores = [answer_scores(g).get(normalize_answer(p), 0.0) for p, g in zip(preds, gts)]
  return sum(scores) / len(scores) if scores else 0.0


def relaxed_correct(target: str, prediction: str, tolerance: float = 0.05) -> bool:
  """ChartQA: numbers within 5% of the target (percentages as fractions), else exact case-insensitive match."""
  def num(t: str):
    try:
      return float(t.rstrip("%")) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
      return None
  p, t = num(prediction), num(target)
  if p is not None and t:
    return abs(p - t) / abs(t) <= tolerance
  return prediction.lower() == target.lower()


def relaxed_accuracy(preds: Sequence[str], annotations: Sequence) -> float:
  """Upstream `evaluate_relaxed_accuracy` (note its argument order: the prediction is the 'target')."""
  scores = [max(relaxed_correct(p.strip(), a) for a in (ann if isinstance(ann, list) else [ann]))
            for p, ann in zip(preds, annotations)]
  return sum(scores) / len(scores) if scores else 0.0


def exact_match_accuracy(preds: Sequence[str], annotations: Sequence) -> float:
  scores = [max(float(p.strip().lower() == a.strip().lower()) for a in (ann if isinstance(ann, list) else [ann]))
            for p, ann in zip(preds, annotations)]
  return sum(scores) / len(scores) if scores else 0.0


def _levenshtein(a: str, b: str) -> int:
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def anls(preds: Sequence[str], annotations: Sequence, threshold: float = 0.5) -> float:
  """Average normalised Levenshtein similarity (DocVQA): 1 - dist / max len, zeroed below 0.5, best over the answers."""
  def sim(p: str, g: str) -> float:
    p, g = p.lower().strip(), g.lower().strip()
    if not p and not g:
      return 1.0
    s = 1 - _levenshtein(p, g) / max(len(p), len(g))
    return s if s >= threshold else 0.0
  scores = [max(sim(p, a) for a in (ann if isinstance(ann, list) else [ann])) for p, ann in zip(preds, annotations)]
  return sum(scores) / len(scores) if scores else 0.0


__all__ = ["normalize_answer", "answer_scores", "vqa_accuracy", "relaxed_correct", "relaxed_accuracy",
           "exact_match_accuracy", "anls"]
