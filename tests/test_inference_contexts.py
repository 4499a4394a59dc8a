"""`bagel_jax.inference.contexts`: upstream's context rule, the CfgContext opt-in and the cache rows
(pure bookkeeping on segments, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from bagel_jax.inference import kv_cache as kc
from bagel_jax.inference.contexts import CfgContext, plan_rows, request_contexts, upstream_contexts
from bagel_jax.inference.errors import InferenceError


def _text(n: int) -> kc.TextSegment:
  return kc.TextSegment(tuple(range(10, 10 + n)))


def _image() -> list:
  return [kc.VaeSegment(np.zeros((4, 8), np.float32), (2, 2)), kc.VitSegment(np.zeros((2, 12), np.float32), (1, 2))]


def _parts(order: str, think: bool) -> list:
  """'t' a text, 'i' an image (VAE + ViT), in order; the system prompt first in think mode."""
  parts = [("system", _text(5))] if think else []
  for c in order:
    parts += [("text", _text(3))] if c == "t" else [("image", s) for s in _image()]
  return parts


def _upstream(parts) -> dict:
  """Upstream inferencer.py `interleave_inference` (the loop over input_lists): cfg_text = a copy of
  gen before each text and after each image; cfg_img gets the system prompt and every text."""
  gen, cfg_text, cfg_img = [], [], []
  i = 0
  while i < len(parts):
    kind, seg = parts[i]
    if kind == "system":
      gen, cfg_img = gen + [seg], cfg_img + [seg]
    elif kind == "text":
      cfg_text = list(gen)
      gen, cfg_img = gen + [seg], cfg_img + [seg]
    else:  # an image: its VAE and ViT segments
      gen = gen + [seg, parts[i + 1][1]]
      cfg_text = list(gen)
      i += 1
    i += 1
  return {"gen": gen, "cfg_text": cfg_text, "cfg_img": cfg_img}


@pytest.mark.parametrize("order", ["t", "it", "ti", "tit", "iti", "itt", "ii", ""])
@pytest.mark.parametrize("think", [False, True])
def test_upstream_rule(order, think):
  parts = _parts(order, think)
  got, want = upstream_contexts(parts), _upstream(parts)
  for nm in want:
    assert [id(s) for s in got[nm]] == [id(s) for s in want[nm]], nm


def test_plan_rows_share_only_what_holds_the_same_plan():
  gen_spec = dict(cfg_text=CfgContext(system=True, keys=False), cfg_img=CfgContext(system=True, texts=True, think=True))
  names = ["gen", "cfg_text", "cfg_img"]
  # text-to-image + think: cfg_img = [system, prompt, plan] = gen: one row; cfg_text has no keys,
  # only the position after the system prompt (5 ids + 2 framing tokens).
  t2i = request_contexts(_parts("t", True), (32, 32), True, gen_spec)
  # [text, image] + think: cfg_img ([system, text, plan]) is a prefix of gen's segments before the
  # plan but not after it: its own row, so the plan is written after its text, not over gen's image.
  ti = request_contexts(_parts("ti", True), (32, 32), True, gen_spec)
  rows, where = plan_rows([t2i, ti], names)
  assert t2i.think_into == ti.think_into == {"gen", "cfg_img"}
  assert where[(0, "cfg_img")] == where[(0, "gen")] and where[(0, "gen")][1:] == (7 + 5, 7 + 5)
  assert where[(0, "cfg_text")] == (where[(0, "gen")][0], 0, 7)
  assert where[(1, "gen")][0] != where[(1, "cfg_img")][0] and len(rows) == 3
  assert where[(1, "cfg_img")][1:] == (12, 12)
  assert all(isinstance(s, (kc.TextSegment, kc.VaeSegment, kc.VitSegment)) for r in rows for s in r)
  # without think the specs keep upstream's non-think contexts; system and plan do not exist
  plain = request_contexts(_parts("it", False), (32, 32), False,
                           dict(cfg_text=CfgContext(images=True), cfg_img=CfgContext(system=True, texts=True, think=True)))
  assert [type(s) for s in plain.contexts["cfg_text"]] == [kc.VaeSegment, kc.VitSegment]
  assert [type(s) for s in plain.contexts["cfg_img"]] == [kc.TextSegment] and not plain.think_into
  with pytest.raises(InferenceError, match="without keys"):
    CfgContext(think=True, keys=False)
