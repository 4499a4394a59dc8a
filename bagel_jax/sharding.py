"""One mesh ('data', 'fsdp', 'tensor'), logical-axis rules, and the shardings of state and batches.

    mesh = make_mesh("fsdp=4,tensor=2")           # Auto axis types; pass to jax.set_mesh
    rules = DEFAULT_RULES                         # logical name -> mesh axes (config data)
    ps = param_shardings(model.abstract_params(), mesh, rules)
    ss = train_state_shardings(abstract_state, mesh, rules)
    bs = batch_shardings(abstract_batch, mesh, rules)
    with use_rules(mesh, rules): ... constrain(x, ("activation_batch", "activation_length", "activation_embed"))

Every parameter gets logical axis names from `PARAM_AXES` (regexes over its path in the
"bagel" tree; the frozen VAE is replicated); the rules map names to mesh axes. A mesh axis
whose size does not divide the dimension is dropped for that dimension (logged), so tiny
test models shard wherever they can. Optimizer-state leaves that mirror a parameter (Adam's
mu and nu, ...) take that parameter's sharding; everything else is replicated.

Multi-host: `initialize_distributed()` (call first thing in an entry point) and
`host_local_to_global` (each process passes its rows of the global batch).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

_log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Logical axis -> mesh axes (MaxText's base.yml, adapted). First match wins.
DEFAULT_RULES: Rules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("expert", None),
    ("norm", None),
    ("table", None),
    ("patch", None),
    ("latent", None),
)

# Parameter path (in the "bagel" tree, "/"-joined) -> logical names, one per dimension.
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # MoT LLM: stacked [L, 2 experts, ...]
    (r"^llm/embed_tokens$", ("vocab", "embed")),
    (r"^llm/lm_head$", ("embed", "vocab")),
    (r"^llm/norm$", ("expert", "norm")),
    (r"^llm/layers/q_proj/kernel$", ("layers", "expert", "embed", "heads")),
    (r"^llm/layers/(k|v)_proj/kernel$", ("layers", "expert", "embed", "kv_heads")),
    (r"^llm/layers/q_proj/bias$", ("layers", "expert", "heads")),
    (r"^llm/layers/(k|v)_proj/bias$", ("layers", "expert", "kv_heads")),
    (r"^llm/layers/o_proj/kernel$", ("layers", "expert", "heads", "embed")),
    (r"^llm/layers/(gate|up)_proj/kernel$", ("layers", "expert", "embed", "mlp")),
    (r"^llm/layers/down_proj/kernel$", ("layers", "expert", "mlp", "embed")),
    (r"^llm/layers/(input_layernorm|post_attention_layernorm|q_norm|k_norm)$", ("layers", "expert", "norm")),
    # SigLIP NaViT: stacked [L, ...]
    (r"^vit/layers/(q|k|v)_proj/kernel$", ("layers", "embed", "heads")),
    (r"^vit/layers/(q|k|v)_proj/bias$", ("layers", "heads")),
    (r"^vit/layers/out_proj/kernel$", ("layers", "heads", "embed")),
    (r"^vit/layers/fc1/kernel$", ("layers", "embed", "mlp")),
    (r"^vit/layers/fc1/bias$", ("layers", "mlp")),
    (r"^vit/layers/fc2/kernel$", ("layers", "mlp", "embed")),
    (r"^vit/layers/(out_proj|fc2)/bias$", ("layers", "norm")),
    (r"^vit/layers/layer_norm\d/(scale|bias)$", ("layers", "norm")),
    (r"^vit/patch_embedding/kernel$", ("patch", "embed")),
    (r"^vit/patch_embedding/bias$", ("norm",)),
    (r"^vit/position_embedding$", ("table", "embed")),
    (r"^vit/post_layernorm/(scale|bias)$", ("norm",)),
    # connector (ViT width -> LLM width), a Megatron pair
    (r"^connector/fc1/kernel$", ("embed", "mlp")),
    (r"^connector/fc1/bias$", ("mlp",)),
    (r"^connector/fc2/kernel$", ("mlp", "embed")),
    (r"^connector/fc2/bias$", ("norm",)),
    # generation heads
    (r"^time_embedder/mlp_in/kernel$", ("table", "mlp")),
    (r"^time_embedder/mlp_in/bias$", ("mlp",)),
    (r"^time_embedder/mlp_out/kernel$", ("mlp", "embed")),
    (r"^time_embedder/mlp_out/bias$", ("norm",)),
    (r"^vae2llm/kernel$", ("latent", "embed")),
    (r"^llm2vae/kernel$", ("embed", "latent")),
    (r"^(vae2llm|llm2vae)/bias$", ("norm",)),
    # frozen sin-cos tables
    (r"^(vit_pos_embed|latent_pos_embed)$", ("table", "embed")),
)


class ShardingError(ValueError):
  pass


# ----------------------------------------------------------------------------- mesh
def parse_mesh(spec: str | dict[str, int] | None) -> dict[str, int]:
  """"fsdp=4,tensor=2" -> {"data": 1, "fsdp": 4, "tensor": 2}; one axis may be -1 (the rest)."""
  if spec is None or spec == "":
    return {"data": 1, "fsdp": -1, "tensor": 1}
  if isinstance(spec, str):
    out = {}
    for part in spec.split(","):
      name, _, val = part.strip().partition("=")
      if name not in MESH_AXES or not val:
        raise ShardingError(f"mesh spec {spec!r}: expected comma-separated AXIS=N with AXIS in {MESH_AXES}")
      out[name] = int(val)
    spec = out
  unknown = set(spec) - set(MESH_AXES)
  if unknown:
    raise ShardingError(f"unknown mesh axes {sorted(unknown)}; the mesh is {MESH_AXES}")
  return {a: int(spec.get(a, 1)) for a in MESH_AXES}


def make_mesh(spec: str | dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh with Auto axis types over `devices` (default: all).

  With several processes, devices are ordered process-major, so 'data' (outermost) spans hosts
  and 'tensor' (innermost) stays within one. Use it with `jax.set_mesh(mesh)`.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec)
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ShardingError("at most one mesh axis may be -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if len(devices) % fixed:
      raise ShardingError(f"{len(devices)} devices are not divisible by {fixed}")
    sizes[free[0]] = len(devices) // fixed
  n = math.prod(sizes.values())
  if n != len(devices):
    raise ShardingError(f"mesh {sizes} needs {n} devices, {len(devices)} are available")
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ----------------------------------------------------------------------------- logical -> physical
def rules_with(overrides: Any = None, base: Rules = DEFAULT_RULES) -> Rules:
  """The rules with some logical axes remapped: {"embed": "fsdp,tensor", "mlp": ""} ("" = replicated).

  `overrides` is config data (`train.sharding_rules` in the training configs); names must exist in `base`."""
  if not overrides:
    return base
  known = {name for name, _ in base}
  out = dict(base)
  for name, axes in dict(overrides).items():
    if name not in known:
      raise ShardingError(f"sharding rule for unknown logical axis {name!r}; known: {', '.join(sorted(known))}")
    parts = tuple(a.strip() for a in axes.split(",") if a.strip()) if isinstance(axes, str) else tuple(axes or ())
    bad = [a for a in parts if a not in MESH_AXES]
    if bad:
      raise ShardingError(f"sharding rule {name}={axes!r}: {bad[0]!r} is not a mesh axis {MESH_AXES}")
    out[name] = None if not parts else parts[0] if len(parts) == 1 else parts
  return tuple((name, out[name]) for name, _ in base)


def _rule(rules: Rules, name: str | None) -> tuple[str, ...]:
  if name is None:
    return ()
  for logical, axes in rules:
    if logical == name:
      if axes is None:
        return ()
      return (axes,) if isinstance(axes, str) else tuple(axes)
  raise ShardingError(f"no rule for logical axis {name!r}")


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """Logical names -> PartitionSpec. With a mesh and shape: drops size-1 axes, mesh axes already
  used by an earlier dimension, and axes that do not divide the dimension."""
  used: set[str] = set()
  out = []
  for d, name in enumerate(names):
    axes = [a for a in _rule(rules, name) if a not in used]
    if mesh is not None:
      axes = [a for a in axes if mesh.shape[a] > 1]
      if shape is not None:
        while axes and shape[d] % math.prod(mesh.shape[a] for a in axes):
          _log.debug("dimension %d (%s, size %d) not divisible by %s: dropping %s", d, name, shape[d], axes, axes[-1])
          axes = axes[:-1]
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  """Logical names of one parameter. `path` is in the bagel tree, or starts with "bagel/" / "vae/"."""
  if path.startswith("vae/") or path == "vae":
    return (None,) * ndim  # the frozen VAE is replicated
  if path.startswith("bagel/"):
    path = path[len("bagel/"):]
  for pattern, names in PARAM_AXES:
    if re.search(pattern, path):
      if len(names) != ndim:
        raise ShardingError(f"{path}: rule {pattern!r} names {len(names)} axes, the parameter has {ndim}")
      return names
  raise ShardingError(f"{path}: no entry in sharding.PARAM_AXES (add one)")


def logical_axes(params: Any) -> Any:
  """The tree of logical-name tuples for a params tree (bagel subtree or {"bagel", "vae"})."""
  return jax.tree_util.tree_map_with_path(lambda p, x: param_logical_axes(path_str(p), len(x.shape)), params)


def param_specs(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda p, x: logical_to_spec(param_logical_axes(path_str(p), len(x.shape)), rules, mesh, x.shape), params)


def param_shardings(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for a params tree (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def replicated(tree: Any, mesh: Mesh) -> Any:
  """One replicated NamedSharding per leaf (the frozen VAE, scalars)."""
  repl = NamedSharding(mesh, P())
  return jax.tree.map(lambda _: repl, tree)


def mirrored_shardings(tree: Any, params: Any, param_sh: Any, mesh: Mesh) -> Any:
  """Shardings for a tree (an optimizer state) whose leaves mirror parameters.

  A leaf takes the sharding of the parameter whose path is the longest suffix of the leaf's
  path and whose shape matches (Adam mu/nu, ...); any other leaf is replicated.
  """
  by_path = {}
  for (p, x), (_, s) in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree_util.tree_leaves_with_path(param_sh)):
    by_path[tuple(path_str([k]) for k in p)] = (tuple(x.shape), s)
  repl = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = tuple(path_str([k]) for k in path)
    for i in range(len(keys)):
      hit = by_path.get(keys[i:])
      if hit is not None and hit[0] == tuple(np.shape(leaf)):
        return hit[1]
    return repl

  return jax.tree_util.tree_map_with_path(pick, tree)


def train_state_shardings(abstract_state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """A TrainState of NamedShardings for `abstract_state` (e.g. `jax.eval_shape` of `init_train_state`)."""
  repl = NamedSharding(mesh, P())
  ps = param_shardings(abstract_state.params, mesh, rules)
  return abstract_state.replace(
      step=repl,
      params=ps,
      opt_state=mirrored_shardings(abstract_state.opt_state, abstract_state.params, ps, mesh),
      ema=None if abstract_state.ema is None else ps,
      rng=repl,
      nonfinite_streak=repl,
      nonfinite_total=repl,
  )


def batch_spec(ndim: int, rules: Rules = DEFAULT_RULES, mesh: Mesh | None = None, shape=None) -> P:
  return logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh, shape)


def batch_shards(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  """Into how many pieces the 'batch' rule splits the global batch on this mesh."""
  spec = logical_to_spec(("batch",), rules, mesh, None)
  return _axes_size(mesh, spec[0] if spec else None)


def batch_shardings(batch: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Every leaf sharded on its leading (global batch) axis by the 'batch' rule."""
  def one(x):
    spec = logical_to_spec(("batch",) + (None,) * (len(x.shape) - 1), rules, mesh, None)
    if x.shape and spec and x.shape[0] % batch_shards(mesh, rules):
      raise ShardingError(f"global batch {x.shape[0]} is not divisible by the batch mesh axes {spec[0]}")
    return NamedSharding(mesh, spec)
  return jax.tree.map(one, batch)


def _axes_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings (Orbax restore targets, AOT lowering)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------- activation constraints
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("bagel_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Makes `constrain` resolve logical names with these rules (active while tracing)."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside `use_rules`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(names, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def active_mesh() -> Mesh | None:
  active = _ACTIVE.get()
  return None if active is None else active[0]


def active_rules() -> Rules | None:
  """The rules of the innermost `use_rules` (None outside)."""
  active = _ACTIVE.get()
  return None if active is None else active[1]


class MeshBound:
  """A jitted function that runs (and lowers) under `jax.set_mesh(mesh)`.

    fn(*args)                 # call
    fn.lower(*args).compile().memory_analysis()   # AOT (abstract args work)
  """

  def __init__(self, jitted: Callable, mesh: jax.sharding.Mesh):
    self.jitted = jitted
    self.mesh = mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


# ----------------------------------------------------------------------------- multi-host
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def wants_distributed() -> bool:
  """True when this process was launched as one of several (our launchers, SLURM srun, TPU pods)."""
  if os.environ.get("BAGEL_DISTRIBUTED", "").lower() in ("0", "false", "no"):
    return False
  if any(os.environ.get(k) for k in _DISTRIBUTED_ENV):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in os.environ:
    return True
  if os.environ.get("BAGEL_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
    return True  # TPU pods: auto-detected by jax.distributed.initialize()
  return False


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
                           cpu_collectives: str | None = None) -> bool:
  """`jax.distributed.initialize` when launched on several processes; call before any JAX work.

  Arguments default to the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
  as set by launch/local.sh), else JAX's cluster auto-detection (SLURM, Cloud TPU, Open MPI).
  On CPU, `cpu_collectives` (default "gloo" when the platform is cpu) enables cross-process collectives.
  Returns True if it initialized.
  """
  if coordinator_address is None and not wants_distributed():
    return False
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  if cpu_collectives is None and env.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    cpu_collectives = "gloo"
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=int(env.get("BAGEL_DISTRIBUTED_TIMEOUT", DISTRIBUTED_TIMEOUT_S)))
  _orbax_distributed_barriers()
  _log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
            jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


# Generous deadlines: on a loaded machine one process may compile or load for minutes longer than another.
DISTRIBUTED_TIMEOUT_S = 900
_barrier_counts: dict[str, int] = {}


def _orbax_distributed_barriers() -> None:
  """Orbax's barriers through the coordination service (with a deadline we set), not through gloo
  collectives, whose rendezvous deadline is a fixed 30 s."""
  from absl import flags
  try:
    import orbax.checkpoint._src.multihost.multihost  # noqa: F401  (defines the flag)
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True
  except (ImportError, AttributeError, flags.Error):
    pass


def barrier(name: str, timeout_s: float | None = None) -> None:
  """Waits until every process reaches `name` (the coordination service; no-op in one process).

  Call it before the first collective of a phase (the first train step, after compiling): a
  process that arrives minutes late then waits here, under BAGEL_DISTRIBUTED_TIMEOUT (900 s),
  instead of tripping gloo's fixed 30 s rendezvous deadline inside the collective.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed
  client = distributed.global_state.client
  if client is None:
    return
  _barrier_counts[name] = _barrier_counts.get(name, 0) + 1
  timeout = timeout_s if timeout_s is not None else float(os.environ.get("BAGEL_DISTRIBUTED_TIMEOUT",
                                                                         DISTRIBUTED_TIMEOUT_S))
  client.wait_at_barrier(f"bagel_{name}_{_barrier_counts[name]}", timeout_in_ms=int(timeout * 1000))


def process_rows(global_batch: int) -> slice:
  """The rows of the global batch this process feeds (contiguous, by process index)."""
  n = jax.process_count()
  if global_batch % n:
    raise ShardingError(f"global batch {global_batch} is not divisible by {n} processes")
  per = global_batch // n
  i = jax.process_index()
  return slice(i * per, (i + 1) * per)


def host_local_to_global(local: Any, shardings: Any) -> Any:
  """Per-process rows -> global jax.Arrays (`jax.make_array_from_process_local_data`).

  `shardings`: a tree matching `local` (e.g. from `batch_shardings`) or one NamedSharding.
  """
  if isinstance(shardings, NamedSharding):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(shardings, np.asarray(x)), local)
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), local, shardings)


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)


__all__ = [
    "MESH_AXES", "DEFAULT_RULES", "PARAM_AXES", "Rules", "ShardingError", "parse_mesh", "make_mesh",
    "logical_to_spec", "param_logical_axes", "logical_axes", "param_specs", "param_shardings",
    "replicated", "mirrored_shardings", "train_state_shardings", "batch_spec", "batch_shards", "batch_shardings", "abstract_with_shardings",
    "use_rules", "constrain", "MeshBound", "rules_with", "active_mesh", "wants_distributed", "initialize_distributed", "barrier", "process_rows",
    "host_local_to_global", "describe",
]
