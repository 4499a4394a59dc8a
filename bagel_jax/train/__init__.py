"""Training: `python -m bagel_jax.train --config configs/NAME.py [--config.key=value ...] --workdir DIR`.

    config.py     base_config() (every key, upstream's defaults) and the checks made before compiling
    step.py       the pure train step: VAE posterior, timesteps, loss, grads, AdamW, EMA, non-finite skip
    optim.py      the optax optimiser, schedules and freeze masks
    checkpoints.py  Orbax checkpoints of the train state and the data iterator
    metrics.py    FLOP counts (MFU), metrics.jsonl and TensorBoard
    vae_stage.py  the demo's tiny VAE, trained before the model
    loop.py       one run in named phases: prepare, build_run, train_loop, evaluation
    plan.py       `python -m bagel_jax.train.plan`: the memory plan of a config, compiled without weights
"""

from bagel_jax.train.config import TrainConfigError, base_config


def __getattr__(name):  # lazy: config files import base_config without JAX's start-up cost
  if name in ("run", "prepare", "Setup"):
    from bagel_jax.train import loop
    return getattr(loop, name)
  raise AttributeError(f"module 'bagel_jax.train' has no attribute {name!r}")


__all__ = ["base_config", "TrainConfigError", "run", "prepare", "Setup"]
