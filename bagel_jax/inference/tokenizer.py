"""Qwen2's tokenizer from a checkpoint folder's `tokenizer.json`, through the `tokenizers` library.

Upstream encodes with `tokenizer.encode(prompt)` (Qwen2 adds no BOS/EOS itself; BAGEL frames
every text with `<|im_start|>` ... `<|im_end|>`) and decodes generated ids with the special
tokens kept, then keeps the text between `<|im_start|>` and `<|im_end|>`.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

from bagel_jax.config import SpecialTokens
from bagel_jax.inference.errors import InferenceError

SPECIAL_NAMES = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}


class Tokenizer:
  def __init__(self, path: str | pathlib.Path):
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
    if not path.is_file():
      raise InferenceError(f"{path}: tokenizer file not found (expected Qwen2's tokenizer.json)")
    try:
      from tokenizers import Tokenizer as _Tok
      self._tok = _Tok.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on malformed JSON
      raise InferenceError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
    self.path = path

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def check(self, tokens: SpecialTokens, vocab_size: int | None = None) -> None:
    """Raises if the special tokens' ids differ from the model's, or ids exceed the embedding."""
    for field, name in SPECIAL_NAMES.items():
      got, want = self.token_to_id(name), getattr(tokens, field)
      if got != want:
        raise InferenceError(f"{self.path}: {name} has id {got}, but the model uses {want}")
    if vocab_size is not None and self.vocab_size > vocab_size:
      raise InferenceError(f"{self.path}: {self.vocab_size} tokens exceed the model's vocabulary of {vocab_size}")


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
  """A checkpoint folder (reads its tokenizer.json) or a tokenizer.json file."""
  return Tokenizer(path)


def strip_generated(text: str) -> str:
  """Upstream's `output.split('<|im_end|>')[0].split('<|im_start|>')[1]` (tolerant of a missing start)."""
  head = text.split("<|im_end|>")[0]
  parts = head.split("<|im_start|>")
  return parts[1] if len(parts) > 1 else parts[0]


__all__ = ["Tokenizer", "load_tokenizer", "strip_generated"]
