"""bagel_jax: a JAX/Flax NNX port of BAGEL-7B-MoT."""


def __getattr__(name):  # lazy: `import bagel_jax` stays light
  if name == "load_checkpoint":
    from bagel_jax.weights.load import load_checkpoint
    return load_checkpoint
  raise AttributeError(f"module 'bagel_jax' has no attribute {name!r}")
