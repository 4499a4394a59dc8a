"""The benchmark runner: items sharded over processes, batches run data-parallel over the local
devices (one model replica per device, or per group of --devices-per-replica devices sharded by
the project's rules), finished items skipped, a progress bar, and a summary JSON.

    run(benchmark, replicas)   # -> the summary dict (also written to OUT/summary.json)

Processes: item i belongs to process i % process_count (`jax.distributed`, initialised by the CLI
from the launch environment).  Each process writes OUT/.eval/process_{i}.json; after a barrier,
process 0 assembles the official output files, scores them and writes OUT/summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
import zlib
from typing import Any, Sequence

import jax

from bagel_jax.sharding import barrier  # the coordination service: no gloo deadline for slow processes
from bagel_jax.eval.core import Benchmark, EvalError, Item
from bagel_jax.eval.images import initial_noise
from bagel_jax.eval.store import write_json

MAX_FAILURES_LISTED = 20


@dataclasses.dataclass
class Tally:
  generated: int = 0
  failed: int = 0
  failures: list = dataclasses.field(default_factory=list)
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  def add(self, ok: int, failed: Sequence[tuple[str, str]] = ()) -> None:
    with self.lock:
      self.generated += ok
      self.failed += len(failed)
      self.failures += list(failed)[:max(0, MAX_FAILURES_LISTED - len(self.failures))]


def build_replicas(inferencer, devices: Sequence[jax.Device], per_replica: int = 1) -> list:
  """One Inferencer per device (parameters copied onto it) or per group of `per_replica` devices
  (a tensor-parallel mesh placed by the project's sharding rules)."""
  from bagel_jax import sharding as shd
  from bagel_jax.inference import Inferencer
  if per_replica < 1 or len(devices) < per_replica:
    raise EvalError(f"--devices-per-replica {per_replica}: needs 1..{len(devices)} (the devices in use)")
  groups = [list(devices[i:i + per_replica]) for i in range(0, len(devices) - per_replica + 1, per_replica)]
  inf = inferencer
  if per_replica == 1:
    return [Inferencer(inf.model, jax.device_put(inf.params, g[0]), inf.tokenizer, cache_dtype=inf.cache_dtype)
            for g in groups]
  return [Inferencer(inf.model, inf.params, inf.tokenizer, cache_dtype=inf.cache_dtype,
                     mesh=shd.make_mesh({"tensor": per_replica}, devices=g)) for g in groups]


def _batches(items: Sequence[Item], size: int) -> list[list[Item]]:
  return [list(items[i:i + size]) for i in range(0, len(items), max(1, size))]


def run_batch(bench: Benchmark, inf, batch: list[Item], tally: Tally) -> None:
  """Builds the batch's requests, runs them in one `Inferencer.batch` call, saves each item."""
  from bagel_jax.inference import InferenceError
  kw = bench.infer_kwargs()
  try:
    per_item = [bench.requests(it) for it in batch]
    reqs = [r for rs in per_item for r in rs]
    if bench.task != "understanding":  # the noise and the output size come from each request
      kw.update(init_noise=[initial_noise(r.seed, r.shape, bench.cfg) for r in reqs],
                output_shapes=[r.shape for r in reqs])
    seed = int(bench.args.seed) + zlib.crc32(batch[0].key.encode())  # think-mode sampling key
    outs = inf.batch([r.inputs for r in reqs], seed=seed, **kw) if reqs else []
    n = 0
    for it, rs in zip(batch, per_item):
      bench.save(it, rs, outs[n:n + len(rs)])
      n += len(rs)
  except (InferenceError, EvalError, OSError) as e:
    tally.add(0, [(it.key, f"{type(e).__name__}: {e}") for it in batch])
    return
  tally.add(len(batch))


def process_items(bench: Benchmark, replicas: Sequence, todo: Sequence[Item], batch_size: int,
                  progress: bool) -> Tally:
  """Runs `todo` on the replicas, one worker thread per replica pulling batches from a queue."""
  from tqdm import tqdm
  tally = Tally()
  work: queue.Queue = queue.Queue()
  for b in _batches(todo, batch_size):
    work.put(b)
  bar = tqdm(total=len(todo), disable=not progress, unit="item", dynamic_ncols=True,
             desc=f"{bench.name} [process {jax.process_index()}/{jax.process_count()}]")
  errors: list[BaseException] = []

  def worker(inf) -> None:
    while not errors:
      try:
        batch = work.get_nowait()
      except queue.Empty:
        return
      try:
        run_batch(bench, inf, batch, tally)
      except BaseException as e:  # a bug, not a user's mistake: stop every worker, re-raise below
        errors.append(e)
        return
      bar.update(len(batch))

  threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in replicas[1:]]
  for t in threads:
    t.start()
  worker(replicas[0])  # the main thread is a worker too (KeyboardInterrupt lands here)
  for t in threads:
    t.join()
  bar.close()
  if errors:
    raise errors[0]
  return tally


def _merge_parts(bench: Benchmark) -> dict[str, Any]:
  parts = []
  for i in range(jax.process_count()):
    p = bench.out / ".eval" / f"process_{i}.json"
    parts.append(json.loads(p.read_text()) if p.is_file() else {"process": i, "missing": True})
  total = {k: sum(p.get("counts", {}).get(k, 0) for p in parts) for k in ("assigned", "finished_before", "generated",
                                                                            "failed")}
  return {"per_process": parts, "counts": total}


def run(bench: Benchmark, items: Sequence[Item], replicas_fn, *, batch_size: int, progress: bool,
        score_only: bool = False, timing: dict[str, float] | None = None) -> dict[str, Any]:
  """Runs this process's share of `items`; process 0 then finalizes. `replicas_fn()` builds the
  replicas (called only when there is work). Returns the summary (process 0) or this process's part."""
  timing = dict(timing or {})
  pi, pc = jax.process_index(), jax.process_count()
  mine = list(items[pi::pc])
  todo = [] if score_only else [it for it in mine if not bench.is_done(it)]
  tally, n_rep = Tally(), 0
  if todo:
    t0 = time.perf_counter()
    replicas = replicas_fn()
    n_rep = len(replicas)
    timing["load_model_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tally = process_items(bench, replicas, todo, batch_size, progress)
    timing["inference_s"] = time.perf_counter() - t0
    timing["items_per_s"] = tally.generated / max(timing["inference_s"], 1e-9)
  part = {"process": pi, "replicas": n_rep, "local_devices": jax.local_device_count(), "timing": timing,
          "counts": {"assigned": len(mine), "finished_before": len(mine) - (0 if score_only else len(todo)),
                     "generated": tally.generated, "failed": tally.failed},
          "failures": [{"key": k, "error": e} for k, e in tally.failures]}
  write_json(bench.out / ".eval" / f"process_{pi}.json", part, indent=1)
  barrier("eval_done")
  if pi != 0:
    return part
  t0 = time.perf_counter()
  scores = bench.finalize(items)
  summary = {"benchmark": bench.name, "task": bench.task, "items": len(items), "processes": pc,
             "settings": _jsonable(bench.settings()), **_merge_parts(bench),
             "finalize_s": time.perf_counter() - t0, "scores": scores}
  summary["failures"] = [f for p in summary["per_process"] for f in p.get("failures", [])]
  summary["counts"]["items"] = len(items)
  summary["counts"]["finished"] = sum(1 for it in items if bench.is_done(it))
  write_json(bench.out / "summary.json", summary, indent=1, ensure_ascii=False)
  return summary


def _jsonable(d: dict) -> dict:
  return json.loads(json.dumps(d, default=str))


__all__ = ["Tally", "build_replicas", "run_batch", "process_items", "barrier", "run"]
