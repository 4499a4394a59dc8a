"""`load_checkpoint`: a converted folder's parameters restored straight into their shardings.

Each device reads only its own slice of every array; nothing is assembled on the host first.
"""

from __future__ import annotations

import json
import math
import pathlib

from bagel_jax.weights.errors import CheckpointError
from bagel_jax.weights.orbax_stream import CONVERSION_FILE, STATE_DIR, OrbaxState
from bagel_jax.weights.safetensors_io import np_dtype

def fsdp_shardings(abstract, mesh, axis: str | tuple[str, ...] | None = None):
  """NamedShardings that split each leaf's largest divisible axis over `axis`.

  `axis` defaults to 'fsdp' if the mesh has it, else all mesh axes together.  Leaves with
  no axis divisible by that many devices are replicated.
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  if axis is None:
    axis = "fsdp" if "fsdp" in mesh.axis_names else tuple(mesh.axis_names)
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  n = math.prod(mesh.shape[a] for a in names)
  spec_axis = names[0] if len(names) == 1 else names

  def one(x):
    dims = [i for i in range(len(x.shape)) if x.shape[i] % n == 0 and x.shape[i] >= n]
    if n == 1 or not dims:
      return NamedSharding(mesh, P())
    best = max(dims, key=lambda i: (x.shape[i], i))
    spec = [None] * len(x.shape)
    spec[best] = spec_axis
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(one, abstract)


def read_conversion_info(folder) -> dict:
  p = pathlib.Path(folder) / CONVERSION_FILE
  return json.loads(p.read_text()) if p.is_file() else {}


def load_checkpoint(dir, mesh=None, dtype=None, shardings=None):
  """Restores a converted folder's (or a Hugging Face repo id's) parameters {"bagel": ..., "vae": ...} as jax.Arrays.

  Shapes come from the folder's configs (`BagelModel(load_config(dir))`), checked against
  the checkpoint.  Each array is restored straight into its target sharding, reading only
  the slices each device holds:
    - `shardings`: a pytree of `jax.sharding.Sharding` matching the parameters, or a
      function (path tuple, ShapeDtypeStruct) -> Sharding;
    - else `mesh`: the project's rules (`bagel_jax.sharding.param_shardings`) on a mesh
      with axes among ('data', 'fsdp', 'tensor'), else `fsdp_shardings` on that mesh;
    - else the first device.
  `dtype` casts every array on restore (default: the stored dtype, bf16 for the LLM/ViT
  weights of the release and f32 for the VAE).
  """
  import jax
  import orbax.checkpoint as ocp

  from bagel_jax.api import BagelModel
  from bagel_jax.config import load_config

  from bagel_jax.weights.hub import resolve_checkpoint

  folder = resolve_checkpoint(dir, need_tokenizer=False).absolute()
  state_dir, config_dir = converted_dirs(folder)
  cfg = load_config(config_dir)
  model_abstract = BagelModel(cfg).abstract_params()
  stored = OrbaxState(state_dir)

  def target(path, x):
    keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    meta = stored.get(keys)
    name = "/".join(map(str, keys))
    if tuple(meta.shape) != tuple(x.shape):
      raise CheckpointError(f"{state_dir}: array {name} has shape {list(meta.shape)}, the config "
                            f"expects {list(x.shape)}")
    return jax.ShapeDtypeStruct(x.shape, np_dtype(dtype) if dtype is not None else meta.dtype)

  abstract = jax.tree_util.tree_map_with_path(target, model_abstract)
  if shardings is None:
    if mesh is not None:
      from bagel_jax import sharding as S
      if set(mesh.axis_names) <= set(S.MESH_AXES):
        shardings = S.param_shardings(abstract, mesh)  # the project's logical-axis rules
      else:
        shardings = fsdp_shardings(abstract, mesh)
    else:
      dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: dev, abstract)
  elif callable(shardings):
    fn = shardings
    shardings = jax.tree_util.tree_map_with_path(
        lambda p, x: fn(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p), x), abstract)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype, global_shape=x.shape), abstract)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
  except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types for damaged files
    line = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"{state_dir}: damaged or incomplete Orbax checkpoint ({line}); convert the "
                          "release again") from None


def converted_dirs(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(the Orbax state folder, the folder of its configs) of a converted folder or of its state/;
  a one-line error naming `folder` when it is neither."""
  if not folder.is_dir():
    raise CheckpointError(f"{folder}: checkpoint folder not found")
  if (folder / STATE_DIR).is_dir():
    return folder / STATE_DIR, folder
  if (folder / "_METADATA").is_file() and (folder.parent / "llm_config.json").is_file():
    return folder, folder.parent  # the state/ folder itself
  raise CheckpointError(f"{folder}: not a converted checkpoint folder (no {STATE_DIR}/ with llm_config.json "
                        "beside it); convert a release with python -m convert.safetensors_to_orbax")


__all__ = ["load_checkpoint", "fsdp_shardings", "read_conversion_info", "converted_dirs"]
