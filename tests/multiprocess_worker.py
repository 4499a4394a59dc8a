"""One process of the multi-process test (launched by tests/test_multiprocess.py).

    launch/local.sh 2 --cpu 4 -- python tests/multiprocess_worker.py --workdir DIR
    python tests/multiprocess_worker.py --process_id I --num_processes 2 --port P --workdir DIR

Each process has 4 CPU devices; with jax.distributed (gloo CPU collectives) they form one
8-device mesh data=2 x fsdp=2 x tensor=2. Every process loads the same initial parameters
(DIR/init.npz), feeds only its rows of each global batch (`host_local_to_global`), runs
three train steps, saves the state with Orbax from all processes, restores it into a
different mesh (fsdp=4 x tensor=2) and writes (process 0) the gathered results to DIR/out.npz.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--process_id", type=int, default=None, help="default: $JAX_PROCESS_ID (launch/local.sh)")
  ap.add_argument("--num_processes", type=int, default=None)
  ap.add_argument("--port", type=int, default=None)
  ap.add_argument("--workdir", required=True)
  a = ap.parse_args()

  from bagel_jax import sharding as shd

  if a.port is None:  # from the environment, as launch/local.sh sets it
    assert shd.initialize_distributed(), "not launched as several processes"
  else:
    shd.initialize_distributed(f"127.0.0.1:{a.port}", a.num_processes, a.process_id, cpu_collectives="gloo")

  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P

  from bagel_jax.train.step import init_train_state, jit_init_train_state, jit_train_step
  from tests.train_fixtures import FAST_COMPILE, HP, ROWS, tiny_batch, tiny_model, tx

  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
  work = pathlib.Path(a.workdir)
  model = tiny_model()
  with np.load(work / "init.npz") as z:
    flat = {k: z[k] for k in z.files}
  abstract_params = model.abstract_params()
  params = jax.tree_util.tree_map_with_path(lambda p, _: flat[shd.path_str(p)], abstract_params)

  mesh = shd.make_mesh("data=2,fsdp=2,tensor=2")
  jax.set_mesh(mesh)

  def global_array(x, s):  # every process holds the full host value; each device takes its shard
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  abstract = jax.eval_shape(lambda q: init_train_state(q, tx(), jax.random.key(1), True), params["bagel"])
  ss = shd.train_state_shardings(abstract, mesh)
  state = jit_init_train_state(tx(), mesh, ss, ema=True, compiler_options=FAST_COMPILE)(
      jax.tree.map(global_array, params["bagel"], ss.params),
      global_array(jax.random.key_data(jax.random.key(1)), NamedSharding(mesh, P())))
  vae = jax.tree.map(lambda x: global_array(x, NamedSharding(mesh, P())), params["vae"])

  first = tiny_batch(model.cfg, ROWS, 0)
  bs = shd.batch_shardings(first, mesh)
  step = jit_train_step(model, tx(), HP, mesh, shd.DEFAULT_RULES, ss, bs, compiler_options=FAST_COMPILE)
  rows = shd.process_rows(ROWS)
  losses = []
  for seed in (0, 1, 2):
    full = tiny_batch(model.cfg, ROWS, seed)  # a real loader would only read its own rows
    local = jax.tree.map(lambda x: np.asarray(x)[rows], full)
    if seed == 0:  # both processes compiled before the first collective (gloo's rendezvous deadline is 30 s)
      step.lower(state, vae, shd.host_local_to_global(local, bs)).compile()
      shd.barrier("first_step")
    state, m = step(state, vae, shd.host_local_to_global(local, bs))
    losses.append([float(m[k]) for k in ("loss", "ce", "mse", "grad_norm")])

  # Orbax from all processes, then restore into another mesh straight from abstract targets.
  mngr = ocp.CheckpointManager(work / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2))
  mngr.save(int(state.step), args=ocp.args.StandardSave(state))
  mngr.wait_until_finished()
  mesh2 = shd.make_mesh("fsdp=4,tensor=2")
  ss2 = shd.train_state_shardings(abstract, mesh2)
  target = shd.abstract_with_shardings(jax.eval_shape(lambda: state), ss2)
  restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(target))
  mngr.close()
  q = restored.params["llm"]["layers"]["q_proj"]["kernel"]
  assert q.sharding.spec == P(None, None, "fsdp", "tensor"), q.sharding

  gathered = multihost_utils.process_allgather(state, tiled=True)
  back = multihost_utils.process_allgather(restored, tiled=True)
  same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(gathered), jax.tree.leaves(back)))
  if jax.process_index() == 0:
    out = {f"params/{shd.path_str(p)}": np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(gathered.params)}
    out.update({f"restored/{shd.path_str(p)}": np.asarray(x)
                for p, x in jax.tree_util.tree_leaves_with_path(back.params)})
    np.savez(work / "out.npz", losses=np.asarray(losses), step=int(back.step), restored_equal=same,
             rng=np.asarray(back.rng), **out)
  multihost_utils.sync_global_devices("done")
  print(f"process {jax.process_index()}: losses {losses}, restore equal {same}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
