"""Tokenizers behind one interface: Qwen2's `tokenizer.json` (through `tokenizers`) and the shapes demo's words.

Both have `encode(text) -> list[int]` (no BOS/EOS: upstream's `tokenizer.encode`; BAGEL frames every
text with `<|im_start|>` ... `<|im_end|>` itself), `decode(ids)` (special tokens kept), `token_to_id`
and `vocab_size`. `load_tokenizer(path)` reads a `tokenizer.json` file or a folder holding one (e.g.
the BAGEL-7B-MoT release folder); the demo's word list lives with its dataset (`bagel_jax.data.shapes`).
"""

from __future__ import annotations

import pathlib
import re
from typing import Mapping, Protocol, Sequence

from bagel_jax.config import SpecialTokens

# The special tokens BAGEL frames text and images with, by their SpecialTokens field.
SPECIAL_NAMES = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}


class TokenizerError(ValueError):
  """A missing or unreadable tokenizer, a word it cannot encode, or ids that do not match the model."""


class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def token_to_id(self, token: str) -> int | None: ...


class WordTokenizer:
  """Lower-cased words and punctuation, one id each; an unknown word is an error (a skipped sample)."""

  _split = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

  def __init__(self, words: Sequence[str], special: Mapping[str, int] | None = None):
    """special: the model's special tokens by name ("<|im_start|>": id), ids past the words: they are
    never produced by `encode`, but `token_to_id` and `decode` know them (the inferencer needs both)."""
    self.words = list(words)
    self.ids = {w: i for i, w in enumerate(self.words)}
    if len(self.ids) != len(self.words):
      raise TokenizerError("WordTokenizer: duplicate words in the vocabulary")
    self.vocab_size = len(self.words)
    self.special = dict(special or {})
    self._special_names = {i: name for name, i in self.special.items()}

  def encode(self, text: str) -> list[int]:
    out = []
    for w in self._split.findall(text.lower()):
      if w not in self.ids:
        raise TokenizerError(f"word {w!r} is not in the {self.vocab_size}-word vocabulary")
      out.append(self.ids[w])
    return out

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(self.words[i] if 0 <= i < self.vocab_size else self._special_names.get(i, f"<{i}>") for i in ids)

  def token_to_id(self, token: str) -> int | None:
    return self.ids.get(token, self.special.get(token))


class QwenTokenizer:
  """A `tokenizers` tokenizer.json (the release's Qwen2.5 tokenizer), without special-token insertion."""

  def __init__(self, path: str | pathlib.Path):
    path = pathlib.Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
      raise TokenizerError(f"{file}: tokenizer file not found (expected Qwen2's tokenizer.json)")
    try:
      from tokenizers import Tokenizer as _Tok
      self._tok = _Tok.from_file(str(file))
    except Exception as e:  # the library raises a bare Exception on malformed JSON
      raise TokenizerError(f"{file}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
    self.path = file
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def __getstate__(self):  # picklable for grain worker processes
    return {"path": str(self.path)}

  def __setstate__(self, state):
    self.__init__(state["path"])


def load_tokenizer(path: str | pathlib.Path) -> QwenTokenizer:
  """A checkpoint folder (reads its tokenizer.json) or a tokenizer.json file."""
  if not str(path):
    raise TokenizerError("no tokenizer given: a path to tokenizer.json or a folder holding one")
  return QwenTokenizer(path)


def check_special_tokens(tok: Tokenizer, tokens: SpecialTokens, vocab_size: int | None = None) -> None:
  """Raises if the special tokens' ids differ from the model's, or ids exceed the embedding."""
  where = getattr(tok, "path", "the tokenizer")
  for field, name in SPECIAL_NAMES.items():
    got, want = tok.token_to_id(name), getattr(tokens, field)
    if got != want:
      raise TokenizerError(f"{where}: {name} has id {got}, but the model uses {want}")
  if vocab_size is not None and tok.vocab_size > vocab_size:
    raise TokenizerError(f"{where}: {tok.vocab_size} tokens exceed the model's vocabulary of {vocab_size}")


__all__ = ["Tokenizer", "TokenizerError", "WordTokenizer", "QwenTokenizer", "load_tokenizer", "check_special_tokens",
           "SPECIAL_NAMES"]
