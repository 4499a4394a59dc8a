"""bagel_jax: a JAX/Flax NNX port of BAGEL-7B-MoT."""
