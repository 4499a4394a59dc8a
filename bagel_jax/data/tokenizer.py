"""Tokenizers: the Qwen2.5 tokenizer of a release folder, and a word-level one for the shapes demo.

Both have `encode(text) -> list[int]` (no BOS, as upstream's `tokenizer.encode`), `decode(ids)`
and `vocab_size`. `load_tokenizer(spec)` takes "shapes" or a path (a `tokenizer.json` file or a
folder holding one, e.g. the BAGEL-7B-MoT release folder).
"""

from __future__ import annotations

import pathlib
import re
from typing import Protocol, Sequence


class TokenizerError(ValueError):
  pass


class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class WordTokenizer:
  """Lower-cased words and punctuation, one id each; an unknown word is an error (a skipped sample)."""

  _split = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

  def __init__(self, words: Sequence[str]):
    self.words = list(words)
    self.ids = {w: i for i, w in enumerate(self.words)}
    if len(self.ids) != len(self.words):
      raise TokenizerError("WordTokenizer: duplicate words in the vocabulary")
    self.vocab_size = len(self.words)

  def encode(self, text: str) -> list[int]:
    out = []
    for w in self._split.findall(text.lower()):
      if w not in self.ids:
        raise TokenizerError(f"word {w!r} is not in the {self.vocab_size}-word vocabulary")
      out.append(self.ids[w])
    return out

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(self.words[i] if 0 <= i < self.vocab_size else f"<{i}>" for i in ids)


class HFTokenizer:
  """A `tokenizers` tokenizer.json (the release's Qwen2.5 tokenizer), without special-token insertion."""

  def __init__(self, path: str | pathlib.Path):
    from tokenizers import Tokenizer as _T
    path = pathlib.Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
      raise TokenizerError(f"{file}: tokenizer file not found")
    self.path = file
    self._tok = _T.from_file(str(file))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=False)

  def __getstate__(self):  # picklable for grain worker processes
    return {"path": str(self.path)}

  def __setstate__(self, state):
    self.__init__(state["path"])


def load_tokenizer(spec: str) -> Tokenizer:
  if spec == "shapes":
    from bagel_jax.data.shapes import tokenizer
    return tokenizer()
  if not spec:
    raise TokenizerError("no tokenizer given (config.tokenizer): 'shapes' or a path to tokenizer.json")
  return HFTokenizer(spec)
