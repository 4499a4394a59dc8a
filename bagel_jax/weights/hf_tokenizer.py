"""A Hugging Face Qwen2 tokenizer folder as upstream reads it, and BAGEL's special-token rule.

Upstream's pre-training (`train/pretrain_unified_navit.py`) loads the slow `Qwen2Tokenizer`
from the LLM folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)
and calls `data.data_utils.add_special_tokens`:

- every one of <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|> that is not among the
  tokenizer's special tokens (bos/eos/unk/sep/pad/cls/mask and additional_special_tokens) is
  passed to `tokenizer.add_tokens`, which gives a token that is in no vocabulary yet the next
  id, `len(tokenizer)` before the call plus its rank (a token already in the vocabulary, or
  already an added token, keeps its id and is not counted);
- if that added any token, the LLM's embeddings are resized to `len(tokenizer)` (the number of
  distinct strings in the vocabulary and the added tokens), which may grow or shrink them.

`read_vocabulary(folder)` rebuilds what that tokenizer holds (transformers' rules for special
tokens absent from the files included: Qwen2Tokenizer's unk/eos/pad default to
<|endoftext|>); `bagel_vocab(vocab)` applies the rule; `write_tokenizer_json` writes the
fast-tokenizer file the project's `QwenTokenizer` reads, with the tokens the rule added.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from bagel_jax.config import SpecialTokens
from bagel_jax.jsonfile import read_json
from bagel_jax.tokenizer import SPECIAL_NAMES, TokenizerError

SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Qwen2Tokenizer's constructor defaults, used when tokenizer_config.json does not set the field.
QWEN2_DEFAULTS = {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
QWEN2_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                     r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


@dataclasses.dataclass
class Vocabulary:
  """The token strings and ids of a slow Qwen2Tokenizer, after its constructor ran."""
  folder: pathlib.Path
  base: dict[str, int]  # vocab.json
  merges: list[tuple[str, str]]
  added: dict[str, int]  # added tokens (tokenizer_config.json added_tokens_decoder, special tokens)
  added_special: dict[str, bool]
  special: list[str]  # every special token string (special_tokens_map values)

  def __len__(self) -> int:
    return len(set(self.base) | set(self.added))

  def token_id(self, token: str) -> int | None:
    return self.added.get(token, self.base.get(token))


@dataclasses.dataclass(frozen=True)
class VocabRule:
  """What upstream's add_special_tokens did: the ids, the tokens it added, the embedding rows."""
  tokens: SpecialTokens
  new_tokens: tuple[str, ...]
  len_tokenizer: int
  rows: int  # the LLM's embedding rows afterwards

  @property
  def resized(self) -> bool:
    return bool(self.new_tokens)


def _content(tok: Any) -> str | None:
  return tok.get("content") if isinstance(tok, dict) else tok


def _read_json(path: pathlib.Path) -> dict:
  return read_json(path, TokenizerError)


def _base_vocab(folder: pathlib.Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
  vocab, merges = folder / "vocab.json", folder / "merges.txt"
  if vocab.is_file() and merges.is_file():
    lines = merges.read_text(encoding="utf-8").splitlines()
    pairs = [tuple(s.split()) for i, s in enumerate(lines) if s.strip() and not (i == 0 and s.startswith("#version:"))]
    return _read_json(vocab), pairs
  fast = folder / "tokenizer.json"
  if fast.is_file():
    model = _read_json(fast).get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
      raise TokenizerError(f"{fast}: not a byte-level BPE tokenizer (Qwen2's)")
    return model["vocab"], [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
  raise TokenizerError(f"{folder}: not a Qwen2 tokenizer folder (no vocab.json + merges.txt, no tokenizer.json)")


def _special_settings(folder: pathlib.Path) -> dict[str, Any]:
  """tokenizer_config.json's special-token fields with Qwen2Tokenizer's defaults, special_tokens_map.json over them."""
  cfg_path, map_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
  cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
  out = {k: _content(cfg[k]) if k in cfg else QWEN2_DEFAULTS.get(k) for k in SPECIAL_ATTRS}
  extra = [_content(t) for t in cfg.get("additional_special_tokens") or []]
  if map_path.is_file():
    for k, v in _read_json(map_path).items():
      if k == "additional_special_tokens":
        extra += [_content(t) for t in v or [] if _content(t) not in extra]
      elif k in SPECIAL_ATTRS and v:
        out[k] = _content(v)
  out["additional_special_tokens"] = extra
  out["added_tokens_decoder"] = cfg.get("added_tokens_decoder", {})
  return out


def read_vocabulary(folder) -> Vocabulary:
  """The vocabulary upstream's Qwen2Tokenizer.from_pretrained(folder) holds."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise TokenizerError(f"{folder}: tokenizer folder not found")
  base, merges = _base_vocab(folder)
  settings = _special_settings(folder)
  added: dict[str, int] = {}
  added_special: dict[str, bool] = {}
  for idx, tok in sorted(settings["added_tokens_decoder"].items(), key=lambda kv: int(kv[0])):
    added[_content(tok)] = int(idx)
    added_special[_content(tok)] = bool(tok.get("special", True)) if isinstance(tok, dict) else True
  special = [settings[k] for k in SPECIAL_ATTRS if settings[k]] + list(settings["additional_special_tokens"])
  special = list(dict.fromkeys(special))
  vocab = Vocabulary(folder, dict(base), merges, added, added_special, special)
  # The constructor adds the special tokens that are not added tokens yet (at the end if new).
  _add_tokens(vocab, [t for t in special if t not in added], special=True)
  return vocab


def _add_tokens(vocab: Vocabulary, tokens: list[str], *, special: bool) -> list[str]:
  """transformers' `_add_tokens`: returns the tokens that got a new id (the count add_tokens returns)."""
  start, new = len(vocab), []
  for tok in tokens:
    if not tok or tok in vocab.added:
      continue
    if tok in vocab.base:
      vocab.added[tok] = vocab.base[tok]
    else:
      vocab.added[tok] = start + len(new)
      new.append(tok)
    vocab.added_special[tok] = special or tok in vocab.special
  return new


def bagel_vocab(vocab: Vocabulary, llm_vocab_size: int) -> VocabRule:
  """Upstream's add_special_tokens plus the resize in main(); `vocab` gets the added tokens."""
  missing = [name for name in SPECIAL_NAMES.values() if name not in vocab.special]
  new = _add_tokens(vocab, missing, special=False)
  rows = len(vocab) if new else llm_vocab_size
  ids = {field: vocab.token_id(name) for field, name in SPECIAL_NAMES.items()}
  for field, name in SPECIAL_NAMES.items():
    if ids[field] is None or not 0 <= ids[field] < rows:
      raise TokenizerError(f"{vocab.folder}: {name} has id {ids[field]}, outside the LLM's {rows} embedding rows")
  return VocabRule(SpecialTokens(**ids), tuple(new), len(vocab), rows)


# ----------------------------------------------------------------------------- tokenizer.json
def _added_entry(vocab: Vocabulary, tok: str) -> dict[str, Any]:
  special = vocab.added_special.get(tok, True)
  return {"id": vocab.added[tok], "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": not special, "special": special}


def _from_slow(vocab: Vocabulary) -> dict[str, Any]:
  """transformers' Qwen2 slow->fast conversion: NFC, the Qwen2 split regex, byte-level BPE."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

  first_added = min(vocab.added.values(), default=len(vocab.base))
  base = {t: i for t, i in vocab.base.items() if i < first_added}
  if sorted(base.values()) != list(range(first_added)):
    raise TokenizerError(f"{vocab.folder}: vocab.json ids below {first_added} are not contiguous; "
                         "cannot write tokenizer.json")
  produced = {a + b for a, b in vocab.merges}
  for t, i in vocab.base.items():
    if i >= first_added and t not in vocab.added and t in produced:
      raise TokenizerError(f"{vocab.folder}: vocab.json token {t!r} (id {i}) lies among the added tokens' ids; "
                           "cannot write tokenizer.json")
  merges = [m for m in vocab.merges if m[0] in base and m[1] in base and m[0] + m[1] in base]
  tok = Tokenizer(models.BPE(vocab=base, merges=merges, fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return json.loads(tok.to_str())


def tokenizer_json(vocab: Vocabulary, rule: VocabRule) -> str:
  """The fast tokenizer (the folder's tokenizer.json, or one built from the slow files) with every added token."""
  from tokenizers import Tokenizer

  src = vocab.folder / "tokenizer.json"
  data = _read_json(src) if src.is_file() else _from_slow(vocab)
  have = {t["content"] for t in data.get("added_tokens") or []}
  todo = sorted((t for t in vocab.added if t not in have), key=lambda t: vocab.added[t])
  data["added_tokens"] = list(data.get("added_tokens") or []) + [_added_entry(vocab, t) for t in todo]
  text = json.dumps(data, ensure_ascii=False)
  built = Tokenizer.from_str(text)
  for t in (*todo, *rule.new_tokens):
    if built.token_to_id(t) != vocab.added[t]:
      raise TokenizerError(f"{vocab.folder}: cannot write tokenizer.json with {t!r} at id {vocab.added[t]} "
                           f"(the fast tokenizer gives it {built.token_to_id(t)})")
  return text


def tokenizer_config_json(vocab: Vocabulary, rule: VocabRule) -> str | None:
  """tokenizer_config.json with the rule's new tokens in added_tokens_decoder (None: nothing to change)."""
  path = vocab.folder / "tokenizer_config.json"
  if not rule.resized:
    return None
  cfg = _read_json(path) if path.is_file() else {"tokenizer_class": "Qwen2Tokenizer"}
  dec = dict(cfg.get("added_tokens_decoder", {}))
  for t in rule.new_tokens:
    e = _added_entry(vocab, t)
    dec[str(e.pop("id"))] = e
  cfg["added_tokens_decoder"] = dec
  return json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"


__all__ = ["Vocabulary", "VocabRule", "read_vocabulary", "bagel_vocab", "tokenizer_json", "tokenizer_config_json"]
