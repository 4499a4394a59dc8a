"""The contexts of one request and the cache rows they are prefilled into.

Upstream's `InterleaveInferencer.interleave_inference` keeps three contexts per image request:
gen (everything), cfg_text (gen as it was before the last text: after an image it is a copy of gen)
and cfg_img (the texts only, no image).  In think mode the system prompt opens gen and cfg_img, and
the generated plan is appended to gen only.  `upstream_contexts` is that rule.

Upstream's benchmark scripts (`eval/gen/gen_images_mp_*.py`, `eval/gen/gedit/gen_images_gedit.py`)
build their CFG contexts by hand and differ from it in think mode; `CfgContext` lets a runner say
what a CFG context holds instead (`Inferencer.batch(cfg_text_context=..., cfg_img_context=...)`).

A request is described by its parts, in order: ("system", text segment), ("text", segment) and
("image", segment) (an input image is a VAE and a ViT segment, or the ViT alone for understanding).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from bagel_jax.inference import kv_cache as kc
from bagel_jax.inference.errors import InferenceError

Part = tuple[str, kc.Segment]  # ("system" | "text" | "image", segment)


@dataclasses.dataclass(frozen=True)
class CfgContext:
  """What one CFG context holds, in the request's order (an opt-in; None: upstream's inferencer rule).

  system: the think system prompt (think mode only); images: the input images (as in gen);
  texts: the input texts; think: the generated plan, appended once decoded (think mode only);
  keys: False for a context that holds no keys at all, only the rope position after the parts
  above (upstream's WISE script passes `cfg_text_past_key_values=None` with the system prompt's
  position: the image tokens attend only to themselves).
  """

  system: bool = False
  images: bool = False
  texts: bool = False
  think: bool = False
  keys: bool = True

  def __post_init__(self):
    if self.think and not self.keys:
      raise InferenceError("CfgContext(think=True, keys=False): a context without keys cannot hold the plan")


@dataclasses.dataclass
class RequestContexts:
  """contexts: gen / cfg_text / cfg_img -> segments; image_shape: the output's pixel size;
  think_into: the contexts the generated plan is appended to; positions: contexts that hold no
  keys -> their next rope id."""

  contexts: dict[str, list]
  image_shape: tuple[int, int]
  think_into: frozenset[str] = frozenset()
  positions: dict[str, int] = dataclasses.field(default_factory=dict)


def upstream_contexts(parts: Sequence[Part]) -> dict[str, list]:
  """Upstream `interleave_inference`: gen = every part; cfg_text = gen before the last text when the
  last input is a text, else gen (a copy after every image), empty without inputs; cfg_img = the
  system prompt and the texts.  The lists share segment objects (prefix detection)."""
  gen = [s for _, s in parts]
  inputs = [k for k, _ in parts if k != "system"]
  if not inputs:
    cfg_text: list = []
  else:
    cfg_text = gen[:-1] if inputs[-1] == "text" else list(gen)
  cfg_img = [s for k, s in parts if k in ("system", "text")]
  return {"gen": gen, "cfg_text": cfg_text, "cfg_img": cfg_img}


def select(parts: Sequence[Part], spec: CfgContext) -> list:
  """The segments of `parts` that `spec` keeps, in order."""
  keep = {"system": spec.system, "image": spec.images, "text": spec.texts}
  return [s for k, s in parts if keep[k]]


def request_contexts(parts: Sequence[Part], image_shape: tuple[int, int], think: bool,
                     overrides: dict[str, CfgContext | None] | None = None) -> RequestContexts:
  """Upstream's contexts, with the CFG contexts named in `overrides` built from their spec instead."""
  req = RequestContexts(upstream_contexts(parts), tuple(image_shape), frozenset({"gen"} if think else ()))
  for name, spec in (overrides or {}).items():
    if spec is None:
      continue
    segs = select(parts, spec)
    if spec.keys:
      req.contexts[name] = segs
      if spec.think and think:
        req.think_into = req.think_into | {name}
    else:
      req.contexts[name] = []
      req.positions[name] = kc.context_rope(segs)
  return req


def assign_rows(contexts: Sequence[dict[str, list]], names: Sequence[str]):
  """Cache rows for the contexts `names` of each request: a context whose segments are a prefix of
  another context of the same request (same segment objects) reads that context's row.

  Returns (rows: the segment lists to prefill, where: {(request, name): (row, length, next rope)}).
  """
  rows: list[list] = []
  owner: list[int] = []
  where: dict[tuple[int, str], tuple[int, int, int]] = {}
  todo = sorted(((i, nm) for i in range(len(contexts)) for nm in names), key=lambda x: -len(contexts[x[0]][x[1]]))
  for i, nm in todo:  # longest first (stable: gen before the CFG contexts on ties)
    segs = contexts[i][nm]
    row = next((r for r, (o, src) in enumerate(zip(owner, rows))
                if o == i and len(src) >= len(segs) and all(a is b for a, b in zip(src, segs))), None)
    if row is None:
      rows.append(list(segs))
      owner.append(i)
      row = len(rows) - 1
    where[(i, nm)] = (row, kc.context_length(segs), kc.context_rope(segs))
  return rows, where


@dataclasses.dataclass(frozen=True, eq=False)
class _PlanSlot:
  """Where a request's plan will go: closes the contexts that receive it, so that only contexts
  receiving the same plan at the same place share a cache row.  No tokens until filled."""

  num_tokens = 0
  rope_advance = 0


def plan_rows(reqs: Sequence[RequestContexts], names: Sequence[str]):
  """`assign_rows` for whole requests: contexts that receive the plan end with the request's slot
  (stripped from the returned rows); contexts without keys read a row with length 0 at their
  position.  Returns (rows, where) as `assign_rows`."""
  views = []
  for r in reqs:
    slot = _PlanSlot()
    views.append({nm: list(segs) + ([slot] if nm in r.think_into else []) for nm, segs in r.contexts.items()})
  rows, where = assign_rows(views, names)
  rows = [[s for s in segs if not isinstance(s, _PlanSlot)] for segs in rows]
  for (i, nm), (row, _, _) in list(where.items()):
    if nm in reqs[i].positions:
      where[(i, nm)] = (row, 0, reqs[i].positions[nm])
  return rows, where


__all__ = ["Part", "CfgContext", "RequestContexts", "upstream_contexts", "select", "request_contexts",
           "assign_rows", "plan_rows"]
