"""Weight-only int8 quantization of the LLM's matmul weights, for inference (`--quantize int8`).

Every MoT decoder kernel (q/k/v/o, gate/up/down; both experts, all layers: about 93% of the
7B-MoT's parameters) is stored as int8 with one float scale per output channel (symmetric,
absmax / 127).  `QuantizedArray` is a pytree that the unchanged decoder reads through
`kernel[e].astype(dtype)`: the scan over layers slices it like any array, and the dequantization
(one layer's kernel at a time) happens inside the compiled layer, so memory holds int8 weights
plus one layer's dequantized kernels at most.  Embeddings, the LM head, norms, biases, the ViT,
the connector and the VAE stay in their dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@jax.tree_util.register_pytree_node_class
class QuantizedArray:
  """int8 values q [..., in, out] and per-output-channel scales [..., 1, out]; value = q * scale."""

  def __init__(self, q, scale, dtype=jnp.bfloat16):
    self.q = q
    self.scale = scale
    self.logical_dtype = jnp.dtype(dtype)

  def tree_flatten(self):
    return (self.q, self.scale), self.logical_dtype

  @classmethod
  def tree_unflatten(cls, dtype, children):
    return cls(*children, dtype=dtype)

  @property
  def shape(self):
    return self.q.shape

  @property
  def ndim(self):
    return len(self.q.shape)

  @property
  def dtype(self):
    return self.logical_dtype

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.q.shape)) + int(np.prod(self.scale.shape)) * jnp.dtype(self.scale.dtype).itemsize

  def __getitem__(self, idx):
    if idx is Ellipsis:
      return self
    idx = idx if isinstance(idx, tuple) else (idx,)
    if len(idx) > self.ndim - 2 or any(i is Ellipsis for i in idx):
      raise IndexError("QuantizedArray: only the leading (layer/expert) axes can be indexed")
    return QuantizedArray(self.q[idx], self.scale[idx], self.logical_dtype)

  def astype(self, dtype):
    return self.q.astype(dtype) * self.scale.astype(dtype)

  def dequantize(self):
    return self.astype(self.logical_dtype)

  def __repr__(self):
    return f"QuantizedArray(shape={self.shape}, int8, scale {self.scale.shape} {self.scale.dtype})"


def quantize_int8(w: jax.Array, scale_dtype=jnp.float32) -> QuantizedArray:
  """Symmetric per-output-channel int8 of a kernel [..., in, out]."""
  wf = jnp.asarray(w).astype(jnp.float32)
  amax = jnp.max(jnp.abs(wf), axis=-2, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8)
  return QuantizedArray(q, scale.astype(scale_dtype), jnp.asarray(w).dtype)


def _layers(params: dict) -> dict:
  return params["bagel"]["llm"]["layers"]


def quantize_params(params: dict, mode: str = "int8", *, free_inputs: bool = False) -> dict:
  """A copy of `params` with the decoder's matmul kernels quantized (mode "int8"; "none": unchanged).

  free_inputs: delete each full-precision kernel once quantized (the input params become unusable),
  so that peak memory stays near the full-precision size.
  """
  if mode in (None, "none", "bf16", "fp32"):
    return params
  if mode != "int8":
    raise ValueError(f"quantization mode {mode!r} is not supported (int8 or none)")
  out = jax.tree.map(lambda x: x, params)
  layers = _layers(out)
  for name in QUANTIZED_LINEARS:
    k = layers[name]["kernel"]
    if not isinstance(k, QuantizedArray):
      layers[name]["kernel"] = jax.jit(quantize_int8)(k)
      if free_inputs and isinstance(k, jax.Array):
        k.delete()
  return out


def _is_decoder_kernel(names: list) -> bool:
  return "llm" in names and "layers" in names and names[-1] == "kernel" and any(n in QUANTIZED_LINEARS for n in names)


def random_params(model, rng: jax.Array, quantize: str = "none") -> dict:
  """Random params drawn leaf by leaf on the device (no full-precision copy when quantized; for benchmarks).

  Kernels ~ N(0, 1/fan_in), norm weights 1, everything else N(0, 0.02^2): the shapes, dtypes and
  costs of a real checkpoint, not its values.
  """
  abstract = model.abstract_params()
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  keys = jax.random.split(rng, len(leaves))

  @functools.partial(jax.jit, static_argnames=("shape", "dtype", "std"))
  def normal(k, shape, dtype, std):
    return (jax.random.normal(k, shape, dtype) * jnp.asarray(std, dtype)).astype(dtype)

  @functools.partial(jax.jit, static_argnames=("shape",))
  def int8(k, shape):
    return jax.random.randint(k, shape, -127, 128, jnp.int8)

  out = []
  for (path, a), k in zip(leaves, keys):
    names = [str(getattr(p, "key", getattr(p, "idx", ""))) for p in path]
    shape, dtype = tuple(a.shape), jnp.dtype(a.dtype)
    fan_in = shape[-2] if len(shape) >= 2 else 1
    if quantize == "int8" and _is_decoder_kernel(names):
      scale = jnp.full(shape[:-2] + (1, shape[-1]), (3.0 / fan_in) ** 0.5 / 127.0, jnp.float32)
      out.append(QuantizedArray(int8(k, shape), scale, dtype))
    elif any("norm" in n for n in names) and names[-1] in ("scale", "norm", "q_norm", "k_norm", "input_layernorm",
                                                          "post_attention_layernorm", "weight"):
      out.append(jnp.ones(shape, dtype))
    elif names[-1] == "kernel" or len(shape) >= 2:
      out.append(normal(k, shape, dtype, float(fan_in) ** -0.5))
    else:
      out.append(normal(k, shape, dtype, 0.02))
  return jax.tree_util.tree_unflatten(treedef, out)


def param_bytes(params: Any) -> int:
  total = 0
  for x in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, QuantizedArray)):
    total += x.nbytes if isinstance(x, QuantizedArray) else int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
  return total


__all__ = ["QuantizedArray", "quantize_int8", "quantize_params", "random_params", "param_bytes",
           "QUANTIZED_LINEARS"]
