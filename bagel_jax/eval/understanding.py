"""Shared core of the understanding benchmarks (upstream `eval/vlm`): greedy answers with upstream's
`model.chat` context (each image through the ViT, then the question), one record per item.
Images go through `bagel_jax.eval.images.vit_input` (upstream's VLM transform).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

from bagel_jax.eval.core import Benchmark, Item, Request
from bagel_jax.eval.images import vit_input
from bagel_jax.eval.store import RecordStore

def option_letter(pred: str, options: dict[str, str], empty: str | None = "C") -> str:
  """Upstream's `post_process` of MMBench/MMMU (empty="C") and MMVP (empty=None): a one-character
  answer is kept, else its first character if it is an option letter, else the first option whose
  text appears in the answer, else the answer itself."""
  pred = pred.strip()
  if len(pred) == 1:
    return pred
  if len(pred) == 0 and empty is not None:
    return empty
  if pred[:1] in options:
    return pred[0]
  for k, v in options.items():
    if v in pred:
      return k
  return pred


class ChatBenchmark(Benchmark):
  """Understanding: subclasses give `images`, `question`, `record` and `write_outputs`."""

  task: ClassVar[str] = "understanding"
  max_new_tokens: ClassVar[int] = 100

  def __init__(self, args, cfg):
    super().__init__(args, cfg)
    self.store = RecordStore(self.out)

  def new_tokens(self) -> int:
    n = getattr(self.args, "max_new_tokens", None)
    return int(n) if n else self.max_new_tokens

  def infer_kwargs(self) -> dict[str, Any]:
    # upstream `model.chat(..., max_length=max_new_tokens)`: greedy; the limit counts <|im_start|>.
    return dict(understanding_output=True, max_think_token_n=self.new_tokens(), do_sample=False)

  def images(self, item: Item) -> list:
    raise NotImplementedError

  def question(self, item: Item) -> str:
    raise NotImplementedError

  def record(self, item: Item, response: str) -> dict:
    return {"response": response}

  def write_outputs(self, done: list[tuple[Item, dict]]) -> dict[str, Any]:
    raise NotImplementedError

  def is_done(self, item: Item) -> bool:
    return self.store.has(item.key)

  def requests(self, item: Item) -> list[Request]:
    return [Request([vit_input(im, self.cfg) for im in self.images(item)] + [self.question(item)])]

  def save(self, item: Item, requests: Sequence[Request], outputs: Sequence[list]) -> None:
    [[response]] = outputs
    self.store.put(item.key, {"key": item.key, "question": self.question(item), **self.record(item, response)})

  def finalize(self, items: Sequence[Item]) -> dict[str, Any]:
    done = [(it, rec) for it in items if (rec := self.store.get(it.key)) is not None]
    if not done:
      return {}
    return self.write_outputs(done)


__all__ = ["option_letter", "ChatBenchmark"]
