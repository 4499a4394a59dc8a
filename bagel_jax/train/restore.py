"""A training run's weights for inference: `load_run(WORKDIR)` (e.g. the shapes demo's `runs/shapes`).

    run = load_run("runs/shapes")
    inf = Inferencer(run.model, run.params, run.tokenizer)

Reads the run's `config.json` (the model config and tokenizer), the VAE (`vae/`, with the latent
statistics of `vae_stats.json` when the VAE stage trained it) and, from the latest checkpoint in
`checkpoints/`, only the model weights: the EMA copy when the run keeps one and `eval.use_ema`
is on (as the run's own evaluation), else the trained parameters.  The optimiser state and the
data iterator are not read.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from bagel_jax.weights.errors import CheckpointError


@dataclasses.dataclass
class RunWeights:
  model: Any  # BagelModel
  params: dict  # {"bagel": ..., "vae": ...}
  tokenizer: Any
  step: int
  weights: str  # "ema" or "params"


def is_run(folder: str | pathlib.Path) -> bool:
  """A trainer workdir: `config.json` and `checkpoints/`."""
  folder = pathlib.Path(folder)
  return (folder / "config.json").is_file() and (folder / "checkpoints").is_dir()


def read_config(workdir: pathlib.Path):
  import ml_collections
  path = workdir / "config.json"
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable run config ({type(e).__name__})") from None


def _model_config(config, workdir: pathlib.Path):
  from bagel_jax.train.config import model_config
  cfg = model_config(config)
  stats = workdir / "vae_stats.json"
  if int(config.vae_stage.steps) > 0:
    if not stats.is_file():
      raise CheckpointError(f"{stats}: file not found (the run's VAE stage has not finished)")
    s = json.loads(stats.read_text())
    cfg = cfg.replace(vae=dataclasses.replace(cfg.vae, scale_factor=s["scale_factor"], shift_factor=s["shift_factor"]))
  return cfg


def _restore_weights(directory: pathlib.Path, abstract: dict, use_ema: bool) -> tuple[dict, int, str]:
  """The latest step's model weights only (a subset of the saved train state)."""
  import jax
  import orbax.checkpoint as ocp

  from bagel_jax.train.checkpoints import flatten, unflatten
  mngr = ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(create=False, read_only=True))
  step = mngr.latest_step()
  if step is None:
    raise CheckpointError(f"{directory}: no checkpoint saved yet")
  saved = set(mngr.item_metadata(step)["state"].keys())
  prefix = "ema" if use_ema and any(k.startswith("ema/") for k in saved) else "params"
  target = {f"{prefix}/{k}": jax.ShapeDtypeStruct(x.shape, x.dtype) for k, x in flatten(abstract).items()}
  missing = sorted(set(target) - saved)
  if missing:
    raise CheckpointError(f"{directory / str(step)}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more); "
                          "the run's config does not match it")
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restore_args = {k: ocp.ArrayRestoreArgs(sharding=dev, dtype=x.dtype, global_shape=x.shape) for k, x in target.items()}
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(target, restore_args=restore_args,
                                                                                  partial_restore=True)))
  n = len(prefix) + 1
  return unflatten({k[n:]: v for k, v in out["state"].items()}, abstract), int(step), prefix


def load_run(workdir: str | pathlib.Path, *, dtype=None) -> RunWeights:
  """The run's model, weights and tokenizer (see the module doc); dtype: the parameters' (default: the run's)."""
  from bagel_jax.api import BagelModel
  from bagel_jax.train.checkpoints import load_params
  from bagel_jax.train.config import dtype_of
  from bagel_jax.train.loop import training_tokenizer

  workdir = pathlib.Path(workdir)
  config = read_config(workdir)
  cfg = _model_config(config, workdir)
  dt = dtype if dtype is not None else dtype_of(config.model.param_dtype)
  model = BagelModel(cfg, param_dtype=dt, dtype=dt, attention_impl=config.model.attention)
  abstract = model.abstract_params()
  if not (workdir / "vae").is_dir():
    raise CheckpointError(f"{workdir / 'vae'}: the run's VAE parameters are missing")
  bagel, step, which = _restore_weights(workdir / "checkpoints", abstract["bagel"], bool(config.eval.use_ema))
  params = {"bagel": bagel, "vae": load_params(workdir / "vae", abstract["vae"])}
  return RunWeights(model, params, training_tokenizer(config.tokenizer), step, which)


__all__ = ["RunWeights", "is_run", "load_run"]
