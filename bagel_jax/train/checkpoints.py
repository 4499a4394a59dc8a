"""Training checkpoints: an Orbax CheckpointManager holding the train state and the data iterator.

    ckpt = Checkpointer(workdir / "checkpoints", keep=3, save_every=1000, async_save=True)
    found = ckpt.restore_latest(abstract_state)    # None on a fresh start, else (step, state, data_state, meta)
    ckpt.save(step, state, data_state, meta)       # every `save_every` steps (or force=True)
    ckpt.close()                                   # waits for pending async writes

A step folder holds three items: `state` (the TrainState's arrays, a flat dict keyed by their
"/"-joined tree paths, `StandardSave`), `data` (the grain iterator state, JSON) and `meta`
(JSON: step, config, model config, and a fingerprint of every array and of the data state).
The flat layout makes restore independent of optax's empty state nodes and of `ema=None`;
restore checks that the saved paths are exactly the target's and names the difference
otherwise. Abstract leaves carrying a `sharding` are restored straight into it.

Faults:
- Orbax writes to a temporary folder and renames it when complete, so a process killed during
  a save leaves the previous step as the latest one; the next run removes such temporary
  folders (`cleanup_tmp_directories`).
- A checkpoint whose files were damaged (unreadable metadata, missing or truncated files, or
  arrays whose fingerprint differs from the one saved) is reported in one warning line, set
  aside as `STEP.corrupt-N` (never deleted) and the run resumes from the newest intact one;
  if none is intact, `CheckpointCorrupt` names the folder.
- A state with a non-finite parameter, optimiser moment or EMA value is never saved.
- Rotation (`keep`) removes an old step only when it holds nothing but Orbax's layout; a
  step folder with anything else in it is kept, with one warning line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import re
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bagel_jax.sharding import path_str

PyTree = Any
_log = logging.getLogger("bagel_jax.train")

# What Orbax writes in a step folder (relative paths); anything else is a user's.
ORBAX_STEP_FILE = re.compile(
    r"^(_CHECKPOINT_METADATA|commit_success\.txt|"
    r"(state|data|meta)/(_METADATA|_CHECKPOINT_METADATA|_sharding|manifest\.ocdbt|commit_success\.txt|metadata|"
    r"d/[0-9a-f]+|ocdbt\.process_\d+/(manifest\.ocdbt|d/[0-9a-f]+)|array_metadatas/process_\d+))$")


class CheckpointMismatch(ValueError):
  pass


class CheckpointCorrupt(ValueError):
  """No intact checkpoint is left in a checkpoint folder."""


def flatten(tree: PyTree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for path, x in leaves:
    key = path_str(path) or "root"
    if key in out:
      raise ValueError(f"duplicate checkpoint key {key}")
    out[key] = x
  return out


def unflatten(flat: dict[str, Any], like: PyTree) -> PyTree:
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  return jax.tree_util.tree_unflatten(treedef, [flat[path_str(p) or "root"] for p, _ in paths])


# ----------------------------------------------------------------------------- fingerprints
def _words(x: jax.Array) -> jax.Array:
  """The array's bytes as uint32 words (narrower types widened)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
  if size in unsigned:
    return jax.lax.bitcast_convert_type(x, unsigned[size]).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types: a trailing axis of 2 words


def _fingerprint_fn(flat: dict[str, jax.Array]):
  sums, finite = {}, []
  for k, x in flat.items():
    u = _words(x)
    h = u * jnp.uint32(2654435761)
    h = h ^ (h >> 15)
    sums[k] = jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(h, dtype=jnp.uint32)])
    if jnp.issubdtype(x.dtype, jnp.floating):
      finite.append(jnp.all(jnp.isfinite(x)))
  return sums, jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)


_FINGERPRINT = jax.jit(_fingerprint_fn)


def fingerprint(tree: PyTree) -> tuple[dict[str, list[int]], bool]:
  """Per-array checksums (two wrapping uint32 sums of its words; the same on any mesh) and
  whether every floating value is finite. One pass over the arrays, on their devices."""
  sums, finite = jax.device_get(_FINGERPRINT(flatten(tree)))
  return {k: [int(v) for v in np.asarray(s)] for k, s in sums.items()}, bool(finite)


def data_digest(data_state: dict) -> str:
  return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


def foreign_step_file(step_dir: pathlib.Path) -> str | None:
  """The first file in a step folder that Orbax did not write, or None."""
  for p in sorted(step_dir.rglob("*")):
    rel = p.relative_to(step_dir).as_posix()
    if (p.is_file() or p.is_symlink()) and not ORBAX_STEP_FILE.match(rel):
      return rel
  return None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


# ----------------------------------------------------------------------------- the manager
class Checkpointer:

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, save_every: int = 1000,
               async_save: bool = True, in_flight_hook: Callable[[int], None] | None = None):
    """in_flight_hook(step): called by an async save's writer thread once every item is written,
    just before the step folder is committed (tests: a process killed there is killed mid-save)."""
    self.directory = pathlib.Path(directory).absolute()
    self.save_every = int(save_every)
    self._hook, self._saving = in_flight_hook, -1
    self.keep = max(1, int(keep))
    hook = ocp.AsyncOptions(post_finalization_callback=lambda: self._hook(self._saving)) if in_flight_hook else None
    # Rotation is ours (`_rotate`: it checks what a folder holds before removing it).
    opts = ocp.CheckpointManagerOptions(max_to_keep=None, create=True, cleanup_tmp_directories=True,
                                        enable_async_checkpointing=bool(async_save), async_options=hook)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    self.mngr = ocp.CheckpointManager(self.directory, options=opts, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: PyTree, data_state: dict, meta: dict | None = None, force: bool = False) -> bool:
    if not force and not self.should_save(step):
      return False
    if self.mngr.latest_step() == step:
      return False
    sums, finite = fingerprint(state)
    if not finite:
      _log.error("step %d: the train state holds non-finite values; not saving it (the last checkpoint "
                 "stays the latest)", step)
      return False
    meta = dict(meta or {}, step=int(step), fingerprint=sums, data_sha256=data_digest(data_state))
    args = ocp.args.Composite(state=ocp.args.StandardSave(flatten(state)),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    if self._hook is not None:
      self.mngr.wait_until_finished()  # the hook's step is the one being written
      self._saving = int(step)
    saved = bool(self.mngr.save(step, args=args, force=True))
    self._rotate(step)
    return saved

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict, dict]:
    """One step, checked against the target and against the fingerprints saved with it."""
    target = flatten(abstract_state)
    self._check_layout(step, target)
    out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                          data=ocp.args.JsonRestore(),
                                                          meta=ocp.args.JsonRestore()))
    state, data, meta = unflatten(out["state"], abstract_state), out["data"], out["meta"]
    _verify(state, data, meta)
    return state, data, meta

  def restore_latest(self, abstract_state: PyTree) -> tuple[int, PyTree, dict, dict] | None:
    """The newest intact checkpoint (damaged newer ones are reported and set aside), or None if there is none."""
    steps = sorted(self.mngr.all_steps(), reverse=True)
    for step in steps:
      try:
        return (step, *self.restore(step, abstract_state))
      except CheckpointMismatch:
        raise
      except Exception as e:  # noqa: BLE001 - Orbax, TensorStore and JSON raise many types for damaged files
        aside = self._set_aside(step)
        _log.warning("checkpoint %s is corrupt or incomplete (%s); set aside as %s, resuming from the one before",
                     self.directory / str(step), _first_line(e), aside.name)
    if steps:
      raise CheckpointCorrupt(f"{self.directory}: no intact checkpoint (steps {sorted(steps)} are corrupt or "
                              "incomplete and were set aside as STEP.corrupt-N); move the folder away to start afresh")
    return None

  def _check_layout(self, step: int, target: dict) -> None:
    saved = self.mngr.item_metadata(step)
    saved_state = saved["state"] if saved is not None and "state" in saved else None
    if saved_state is None:
      raise ValueError("no state item")
    have, want = set(saved_state.keys()), set(target.keys())
    if have != want:
      missing, extra = sorted(want - have)[:5], sorted(have - want)[:5]
      raise CheckpointMismatch(f"{self.directory / str(step)}: checkpoint does not match this config's train "
                               f"state (missing {missing}, unexpected {extra}); use a new workdir or the same config")
    for k, x in target.items():
      m = saved_state[k]
      if tuple(getattr(m, "shape", x.shape)) != tuple(x.shape):
        raise CheckpointMismatch(f"{self.directory / str(step)}: {k} has shape {tuple(m.shape)}, this config "
                                 f"expects {tuple(x.shape)}")

  def _set_aside(self, step: int) -> pathlib.Path:
    """Renames a damaged step folder out of Orbax's sight (process 0), keeping its bytes."""
    src, n = self.directory / str(step), 0
    while (self.directory / f"{step}.corrupt-{n}").exists():
      n += 1
    dst = self.directory / f"{step}.corrupt-{n}"
    if jax.process_index() == 0 and src.exists():
      src.rename(dst)
    _sync(f"bagel_set_aside_{step}_{n}")
    self.mngr.reload()
    return dst

  def _rotate(self, current: int) -> None:
    """Keeps the newest `keep` steps; removes older ones that hold only what Orbax wrote."""
    older = sorted((s for s in self.mngr.all_steps() if s < current), reverse=True)
    if jax.process_index() != 0:
      return
    for s in older[self.keep - 1:]:
      d = self.directory / str(s)
      if not d.is_dir():
        continue
      found = foreign_step_file(d)
      if found is not None:
        _log.warning("kept old checkpoint %s: it holds %s, which bagel_jax did not write", d, found)
        continue
      shutil.rmtree(d, ignore_errors=True)

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()


def _verify(state: PyTree, data: dict, meta: dict) -> None:
  """Raises if the restored arrays or data state differ from the fingerprints saved with them."""
  want = meta.get("fingerprint") if isinstance(meta, dict) else None
  if want is None:
    return  # saved before fingerprints existed
  _sync("fingerprint")  # the sums are collectives across processes
  got, _ = fingerprint(state)
  bad = sorted(k for k in want if got.get(k) != want[k])
  if bad or set(got) != set(want):
    raise ValueError(f"array {bad[0] if bad else sorted(set(got) ^ set(want))[0]} differs from its saved fingerprint")
  if "data_sha256" in meta and data_digest(data) != meta["data_sha256"]:
    raise ValueError("the data iterator state differs from its saved digest")


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from bagel_jax.sharding import barrier
    barrier(name)


def save_params(path: str | pathlib.Path, tree: PyTree) -> None:
  """A one-off parameter tree (e.g. the frozen VAE) in its own Orbax folder (synchronous)."""
  path = pathlib.Path(path).absolute()
  with ocp.StandardCheckpointer() as c:
    c.save(path, flatten(tree), force=True)


def load_params(path: str | pathlib.Path, abstract: PyTree) -> PyTree:
  path = pathlib.Path(path).absolute()
  with ocp.StandardCheckpointer() as c:
    flat = c.restore(path, flatten(abstract))
  return unflatten(flat, abstract)
