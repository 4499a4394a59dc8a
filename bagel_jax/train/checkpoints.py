"""Training checkpoints: an Orbax CheckpointManager holding the train state and the data iterator.

    ckpt = Checkpointer(workdir / "checkpoints", keep=3, save_every=1000, async_save=True)
    step = ckpt.latest_step()                        # None on a fresh start
    state, data_state, meta = ckpt.restore(step, abstract_state)   # straight into target shardings
    ckpt.save(step, state, data_state, meta)         # every `save_every` steps (or force=True)
    ckpt.close()                                     # waits for pending async writes

A step folder holds three items: `state` (the TrainState's arrays, a flat dict keyed by their
"/"-joined tree paths, `StandardSave`), `data` (the grain iterator state, JSON) and `meta`
(JSON: step, config, model config). The flat layout makes restore independent of optax's
empty state nodes and of `ema=None`; restore checks that the saved paths are exactly the
target's and names the difference otherwise. Abstract leaves carrying a `sharding` are
restored straight into it (a different mesh than at save time works).

Orbax writes to a temporary folder and renames it when complete, so a process killed during
a save leaves the previous step as the latest one. `save` copies device arrays to host before
it returns, so the next (donating) train step can run while the files are written.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from bagel_jax.sharding import path_str

PyTree = Any


class CheckpointMismatch(ValueError):
  pass


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


class Checkpointer:

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, save_every: int = 1000,
               async_save: bool = True, in_flight_hook: Callable[[int], None] | None = None):
    """in_flight_hook(step): called by an async save's writer thread once every item is written,
    just before the step folder is committed (tests: a process killed there is killed mid-save)."""
    self.directory = pathlib.Path(directory).absolute()
    self.save_every = int(save_every)
    self._hook, self._saving = in_flight_hook, -1
    hook = ocp.AsyncOptions(post_finalization_callback=lambda: self._hook(self._saving)) if in_flight_hook else None
    opts = ocp.CheckpointManagerOptions(max_to_keep=int(keep) if keep else None, create=True,
                                        enable_async_checkpointing=bool(async_save), async_options=hook)
    self.mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: PyTree, data_state: dict, meta: dict | None = None, force: bool = False) -> bool:
    if not force and not self.should_save(step):
      return False
    if self.mngr.latest_step() == step:
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(flatten(state)),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))))
    if self._hook is not None:
      self.mngr.wait_until_finished()  # the hook's step is the one being written
      self._saving = int(step)
    return bool(self.mngr.save(step, args=args, force=True))

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict, dict]:
    target = flatten(abstract_state)
    saved = self.mngr.item_metadata(step)
    saved_state = saved["state"] if saved is not None and "state" in saved else None
    if saved_state is not None:
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
    out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                          data=ocp.args.JsonRestore(),
                                                          meta=ocp.args.JsonRestore()))
    return unflatten(out["state"], abstract_state), out["data"], out["meta"]

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()


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
