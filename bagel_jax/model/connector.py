"""The ViT -> LLM connector (upstream `MLPconnector`): fc1, activation, fc2 (both with bias)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# HF ACT2FN names used by BAGEL's configs.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


class MLPConnector(nnx.Module):
  """[..., in_dim] -> fc1 [in_dim -> out_dim] -> act -> fc2 [out_dim -> out_dim]."""

  def __init__(self, in_dim: int, out_dim: int, act: str = "gelu_pytorch_tanh", *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, dtype=jnp.float32):
    self.act = act
    activation(act)  # fail at construction on an unknown name
    self.fc1 = nnx.Linear(in_dim, out_dim, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.fc2 = nnx.Linear(out_dim, out_dim, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(activation(self.act)(self.fc1(x)))
