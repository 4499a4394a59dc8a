"""One training run, in named phases (everything that can be refused is checked before anything compiles):

1. `prepare`: the config (model, tokenizer, optimiser, mesh) and the data pipeline (paths exist,
   datasets are not empty, image sizes fit the position tables); no compilation;
2. the VAE stage (`vae_stage.py`), if `vae_stage.steps > 0` and `WORKDIR/vae` does not exist yet;
3. `build_run`: the model, mesh, optimiser and train state: restored from the latest checkpoint in
   `WORKDIR/checkpoints` (model, optimiser, EMA, step, RNG and the data iterator: the run continues
   exactly as if it had not stopped), or initialised (`init_params`: random, or `init.checkpoint`);
4. `train_loop`: the jitted step (`step.jit_train_step`) on the mesh, metrics every
   `train.log_every` steps (`StepLog`), async Orbax saves every `train.save_every` steps keeping
   `train.keep`; SIGTERM saves and exits cleanly; a non-finite loss or gradient skips the update
   (counted), `train.max_nonfinite_streak` in a row stop the run;
5. the evaluation of `eval.kind` ("shapes": `bagel_jax.eval.shapes`), if any.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import signal
import time
from typing import Any

import jax
import numpy as np

from bagel_jax.train import init_hf
from bagel_jax.train.config import (TrainConfigError, check_mesh, check_tokenizer, dtype_of, model_config,
                                    sharding_rules)
from bagel_jax.train import validate
from bagel_jax.train.flops import step_flops
from bagel_jax.train.metrics import MetricsWriter, peak_flops, tokens_sq
from bagel_jax.train.vae_stage import vae_stage

_log = logging.getLogger("bagel_jax.train")

EAGER_INIT_MAX_PARAMS = 200_000_000


# ----------------------------------------------------------------------------- 1. set-up (no compilation)
@dataclasses.dataclass
class Setup:
  config: Any
  workdir: pathlib.Path
  model_cfg: Any
  tokenizer: Any
  data: Any  # PackBatches
  group_names: list


def training_tokenizer(spec: str):
  """config.tokenizer: "shapes" (the demo's word tokenizer) or a tokenizer.json / a folder holding one."""
  from bagel_jax.tokenizer import load_tokenizer
  if spec == "shapes":
    from bagel_jax.data import shapes
    return shapes.tokenizer()
  return load_tokenizer(spec)


def check_values(config) -> None:
  """Scalar settings, dtypes, remat policy and attention backend (one line each)."""
  from bagel_jax.attention.api import IMPLS
  from bagel_jax.model.qwen2_mot import REMAT_POLICIES
  from bagel_jax.train import optim

  t = config.train
  validate.check_keys(config)
  validate.check_ranges(config)
  dtype_of(config.model.param_dtype), dtype_of(config.model.dtype)
  optim.schedule(config.optim, int(t.steps))  # refuses a bad schedule
  if config.model.remat not in REMAT_POLICIES:
    raise TrainConfigError(f"model.remat={config.model.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
  if config.model.attention not in IMPLS:
    raise TrainConfigError(f"model.attention={config.model.attention!r}: expected one of {IMPLS}")


def check_workdir(workdir: pathlib.Path) -> None:
  """--workdir is a folder or can become one (no file at it or at a parent)."""
  for p in (workdir, *workdir.parents):
    if p.exists():
      if not p.is_dir():
        raise TrainConfigError(f"--workdir {workdir}: {p} is a file, not a folder")
      return


def prepare(config, workdir) -> Setup:
  """Validates the config and builds the data pipeline; raises a one-line error before any compile."""
  from bagel_jax.data import pipeline

  check_values(config)
  check_workdir(pathlib.Path(workdir))
  cfg = model_config(config)
  validate.check_capacity(config, cfg)
  validate.check_batch_memory(config, cfg, jax.process_count())
  tok = training_tokenizer(init_hf.tokenizer_spec(config, workdir))
  check_tokenizer(tok, cfg)
  data = pipeline.make_pipeline(config.data, cfg, tok, seed=int(config.data.seed),
                                process_index=jax.process_index(), process_count=jax.process_count())
  check_mesh(config)
  if config.vae_stage.steps and config.vae_stage.group not in config.data.groups:
    raise TrainConfigError(f"vae_stage.group={config.vae_stage.group!r} is not a data group "
                           f"({sorted(config.data.groups)})")
  if config.eval.kind not in ("", "shapes"):
    raise TrainConfigError(f"eval.kind={config.eval.kind!r}: expected '' or 'shapes'")
  if config.eval.kind and jax.process_count() > 1:
    raise TrainConfigError(f"eval.kind={config.eval.kind!r} runs in a single process; set --config.eval.kind= "
                           "for multi-process runs and evaluate the checkpoint afterwards")
  return Setup(config, pathlib.Path(workdir), cfg, tok, data, pipeline.group_names(config.data))


# ----------------------------------------------------------------------------- 3. model, mesh and state
def load_init_checkpoint(setup: Setup, model, shardings, vae_shardings):
  """init.checkpoint: a converted Orbax folder (restored into the shardings), a release folder, or a repo id of either."""
  from bagel_jax.config import load_config
  from bagel_jax.weights import table as weights
  from bagel_jax.weights.load import load_checkpoint

  from bagel_jax.weights.hub import resolve_checkpoint

  src = setup.config.init.checkpoint
  folder = resolve_checkpoint(src, need_tokenizer=False)
  abstract = model.abstract_params()
  if (folder / "state").is_dir():
    # Each device reads only its own slices, straight into the target shardings.
    return load_checkpoint(folder, shardings={"bagel": shardings, "vae": vae_shardings}), abstract
  if (folder / "ema.safetensors").is_file():
    release = load_config(folder)
    if release.llm != model.cfg.llm or release.vit != model.cfg.vit:
      raise TrainConfigError(f"init.checkpoint={src}: its llm/vit configs differ from the model's "
                             "(set model.checkpoint to the same folder)")
    return weights.load_upstream(folder, model.cfg, abstract), abstract  # host arrays, placed by the caller
  raise TrainConfigError(f"init.checkpoint={src}: neither a converted Orbax folder (state/) nor a release "
                         "folder (ema.safetensors)")


def random_params(setup: Setup, model, vae_params, shardings, vae_shardings):
  """Random parameters from train.seed (the VAE's from seed + 1 unless the VAE stage made them)."""
  from flax import nnx

  from bagel_jax.model.autoencoder import AutoEncoder
  from bagel_jax.model.bagel import Bagel

  seed = int(setup.config.train.seed)
  # Small models: eager init (XLA compiles random-init graphs slowly on CPU), then placed.
  # Large ones: jitted straight into their shardings, so no device ever holds a whole copy.
  eager = sum(x.size for x in jax.tree.leaves(model.abstract_params())) < EAGER_INIT_MAX_PARAMS

  def init_bagel(key):
    b = Bagel(model.cfg, rngs=nnx.Rngs(params=key), param_dtype=model.param_dtype, dtype=model.dtype,
              attention_impl=model.attention_impl, remat=model.remat, unroll_layers=model.unroll_layers)
    return nnx.to_pure_dict(nnx.state(b))

  def init_vae(key):
    return nnx.to_pure_dict(nnx.state(AutoEncoder(model.cfg.vae, rngs=nnx.Rngs(params=key))))

  def make(fn, key, sh):
    return jax.device_put(fn(key), sh) if eager else jax.jit(fn, out_shardings=sh)(key)

  bagel = make(init_bagel, jax.random.key(seed), shardings)
  if vae_params is None:
    vae_params = make(init_vae, jax.random.key(seed + 1), vae_shardings)
  return bagel, jax.device_put(vae_params, vae_shardings)


def init_params(setup: Setup, model, vae_params, shardings, vae_shardings):
  """Fresh parameters: from init.hf or init.checkpoint, else random (the VAE from the stage if there is one)."""
  hf = init_hf.hf_args(setup.config)
  if hf is not None:
    return init_hf.hf_params(init_hf.open_hf(hf), model, shardings, vae_shardings, vae_params)
  if not setup.config.init.checkpoint:
    return random_params(setup, model, vae_params, shardings, vae_shardings)
  params, abstract = load_init_checkpoint(setup, model, shardings, vae_shardings)
  cast = lambda x, a: x.astype(a.dtype)  # noqa: E731  (master weights in param_dtype)
  bagel = jax.device_put(jax.tree.map(cast, params["bagel"], abstract["bagel"]), shardings)
  vae = jax.tree.map(cast, params["vae"], abstract["vae"]) if vae_params is None else vae_params
  return bagel, jax.device_put(vae, vae_shardings)


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built once by `build_run`."""
  setup: Setup
  model: Any
  mesh: Any
  rules: Any
  tx: Any
  sched: Any
  hp: Any
  state_sh: Any
  vae_sh: Any
  ckpt: Any
  data_iter: Any
  state: Any
  vae_params: Any
  start: int


def build_model(setup: Setup):
  """The VAE (trained by the stage, or None: from the checkpoint / random init) and the BagelModel."""
  from bagel_jax.api import BagelModel

  config, cfg = setup.config, setup.model_cfg
  vae_params = None
  if int(config.vae_stage.steps) > 0:
    vae_params, stats = vae_stage(setup)
    cfg = cfg.replace(vae=dataclasses.replace(cfg.vae, scale_factor=stats["scale_factor"],
                                              shift_factor=stats["shift_factor"]))
  model = BagelModel(cfg, param_dtype=dtype_of(config.model.param_dtype), dtype=dtype_of(config.model.dtype),
                     attention_impl=config.model.attention, remat=config.model.remat,
                     unroll_layers=bool(config.model.unroll_layers))
  return model, vae_params


def build_run(setup: Setup) -> Run:
  """Model, mesh, optimiser, shardings, and the train state: restored from the latest checkpoint or fresh."""
  from bagel_jax import sharding as shd
  from bagel_jax.train import checkpoints, optim
  from bagel_jax.train import step as ts

  config, workdir = setup.config, setup.workdir
  model, vae_params = build_model(setup)
  mesh = shd.make_mesh(config.train.mesh or None)
  rules = sharding_rules(config)
  abstract = model.abstract_params()
  param_sh = shd.param_shardings(abstract["bagel"], mesh, rules)
  repl = jax.sharding.NamedSharding(mesh, jax.P())
  vae_sh = jax.tree.map(lambda _: repl, abstract["vae"])

  tx, sched = optim.make_optimizer(config.optim, abstract["bagel"], int(config.train.steps))
  patterns = optim.frozen_patterns(config.optim)
  ema = float(config.train.ema_decay) > 0
  hp = ts.StepConfig(ce_weight=float(config.train.ce_weight), mse_weight=float(config.train.mse_weight),
                     timestep_shift=float(config.train.timestep_shift),
                     ema_decay=float(config.train.ema_decay) if ema else None, frozen=patterns,
                     grad_accum_steps=int(config.train.grad_accum_steps))
  abstract_state = jax.eval_shape(lambda p: ts.init_train_state(p, tx, jax.random.key(0), ema), abstract["bagel"])
  state_sh = shd.train_state_shardings(abstract_state, mesh, rules)

  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", keep=int(config.train.keep),
                                  save_every=int(config.train.save_every), async_save=bool(config.train.async_save),
                                  in_flight_hook=_debug_save_hook(config, workdir))
  data_iter = NonFiniteBatches(iter(setup.data)) if config.debug.nonfinite_batches else iter(setup.data)
  found = ckpt.restore_latest(shd.abstract_with_shardings(abstract_state, state_sh))  # damaged steps skipped
  vae_file = workdir / "vae"
  if found is not None:
    start, state, data_state, _ = found
    data_iter.set_state(data_state)
    vae_abs = shd.abstract_with_shardings(abstract["vae"], vae_sh)
    vae_params = checkpoints.load_params(vae_file, vae_abs) if vae_params is None else jax.device_put(vae_params, vae_sh)
    _log.info("resumed from %s at step %d", ckpt.directory, start)
  else:
    t0 = time.time()
    bagel, vae_params = init_params(setup, model, vae_params, param_sh, vae_sh)
    _log.info("parameters ready (%.1fs)", time.time() - t0)
    if not _all_agree(vae_file.exists()):  # Orbax saves are collective: every process takes part
      checkpoints.save_params(vae_file, vae_params)
      _log.info("saved the VAE parameters (%.1fs)", time.time() - t0)
    init = ts.jit_init_train_state(tx, mesh, state_sh, ema)
    state = init(bagel, jax.random.key_data(jax.random.key(int(config.train.seed) + 2)))
    start = 0
    _log.info("initialised the train state")
  n_train, n_frozen = optim.count_params(abstract["bagel"], patterns)
  _log.info("model: %s trainable / %s frozen parameters (+ VAE %s, frozen); mesh %s", f"{n_train:,}",
            f"{n_frozen:,}", f"{sum(x.size for x in jax.tree.leaves(abstract['vae'])):,}", shd.describe(mesh))
  return Run(setup, model, mesh, rules, tx, sched, hp, state_sh, vae_sh, ckpt, data_iter, state, vae_params, start)


def _all_agree(flag: bool) -> bool:
  """Process 0's answer on every process (a file-system check may race with another process's write)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  from bagel_jax.sharding import barrier
  barrier("all_agree")  # the broadcast is a gloo collective: no process may arrive 30 s late
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


# ----------------------------------------------------------------------------- 4. the loop
class StepLog:
  """The host side of finished steps: the non-finite streak, and metrics every `log_every` steps."""

  def __init__(self, r: Run, writer: MetricsWriter, bar):
    config = r.setup.config
    self.r, self.writer, self.bar = r, writer, bar
    self.cfg = r.model.cfg
    self.peak = peak_flops(config)
    self.log_every = int(config.train.log_every)
    self.steps = int(config.train.steps)
    self.max_streak = int(config.train.max_nonfinite_streak)
    self.max_skip_fraction = float(config.data.max_skip_fraction)
    self.streak = int(jax.device_get(r.state.nonfinite_streak))
    self.nonfinite_total = int(jax.device_get(r.state.nonfinite_total))
    self.acc: list = []
    self.last: dict = {}
    self.t_last, self.tok_acc, self.flops_acc = time.time(), 0, 0.0

  def restart_clock(self) -> None:
    self.t_last = time.time()

  def finish(self, item, state) -> None:
    """Streak check and logging for a finished step `item` = (step, metrics, info)."""
    from bagel_jax.train import optim

    s, metrics, info = item
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    validate.check_skipped(info, self.max_skip_fraction)
    self.streak = self.streak + 1 if m["skipped"] else 0
    self.nonfinite_total += int(m["skipped"])
    if self.max_streak and self.streak >= self.max_streak:
      raise FloatingPointError(f"{self.streak} steps in a row had a non-finite loss or gradient (last at step {s}); "
                               "stopping. Lower the learning rate or check the data.")
    self.acc.append(m)
    self.tok_acc += info["tokens"]
    self.flops_acc += step_flops(self.cfg.llm, info["tokens"], info["tokens_sq"])
    if s % self.log_every and s != self.steps:
      return
    dt = max(time.time() - self.t_last, 1e-9)
    out = {k: float(np.mean([a[k] for a in self.acc])) for k in ("loss", "ce", "mse", "grad_norm")}
    out.update(lr=float(optim.current_lr(self.r.sched, state.opt_state)) if s else 0.0,
               tokens_per_s=self.tok_acc / dt, steps_per_s=len(self.acc) / dt,
               skipped_samples=info["skipped"] + info["oversized"], nonfinite_updates=self.nonfinite_total,
               samples=info["samples"])
    if self.peak:
      out["mfu"] = self.flops_acc / dt / self.peak
    names = self.r.setup.group_names
    for g, k in info["samples_per_group"].items():
      out[f"samples/{names[int(g)] if int(g) < len(names) else g}"] = k
    self.writer.write(s, out)
    bar = dict(loss=f"{out['loss']:.4f}", ce=f"{out['ce']:.3f}", mse=f"{out['mse']:.4f}",
               tok_s=f"{out['tokens_per_s']:.0f}")
    if "mfu" in out:
      bar["mfu"] = f"{100 * out['mfu']:.1f}%"
    self.bar.set_postfix(**bar)
    self.last = {"step": s, **out}
    self.acc.clear()
    self.t_last, self.tok_acc, self.flops_acc = time.time(), 0, 0.0


class StopSignal:
  """SIGTERM -> finish the current step, save, exit."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    def handler(signum, frame):
      del frame
      self.requested = True
      _log.warning("signal %d received: saving and stopping after this step", signum)
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def next_batch(data_iter, n: int):
  """The next step's TrainBatch and info: `n` pipeline batches (micro-batches), rows interleaved as
  the accumulating step expects; info of the last one with tokens and tokens_sq summed over all."""
  from bagel_jax.train import accumulate
  from bagel_jax.train import step as ts

  parts = [next(data_iter) for _ in range(n)]
  batches = [ts.TrainBatch(layout=a["layout"], vit_patches=a["vit_patches"], vae_images=a["vae_images"])
             for a, _ in parts]
  info = dict(parts[-1][1], tokens=sum(i["tokens"] for _, i in parts),
              tokens_sq=sum(tokens_sq(b.layout) for b in batches))
  return (batches[0] if n == 1 else accumulate.interleave(batches)), info


def compile_step(r: Run, batch):
  """The jitted train step for this batch's static shapes (one compile for the run)."""
  from bagel_jax import sharding as shd
  from bagel_jax.train import step as ts

  # This process holds rows / process_count of the global batch: shard the global shape.
  n_proc = jax.process_count()
  global_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] * n_proc,) + x.shape[1:], x.dtype),
                              jax.eval_shape(lambda b: b, batch))
  batch_sh = shd.batch_shardings(global_batch, r.mesh, r.rules)
  _log.info("compiling the train step (%s rows x %d tokens)", batch.layout.token_kind.shape[0],
            batch.layout.token_kind.shape[1])
  return ts.jit_train_step(r.model, r.tx, r.hp, r.mesh, r.rules, r.state_sh, batch_sh, r.vae_sh), batch_sh


def _hang(r: Run, step: int) -> None:
  """debug.hang_after_step (tests): wait for the save, leave a marker, wait to be killed."""
  r.ckpt.wait()
  (r.setup.workdir / f"HANG_{step}").write_text("waiting to be killed\n")
  while True:
    time.sleep(1.0)


def _debug_save_hook(config, workdir: pathlib.Path):
  """debug.hang_during_save_step (tests): that step's async save leaves a marker and waits to be
  killed once its files are written, before the step folder is committed."""
  hang = int(config.debug.hang_during_save_step)

  def hook(step: int) -> None:
    if step == hang:
      (workdir / f"HANG_SAVE_{step}").write_text("save in flight, waiting to be killed\n")
      while True:
        time.sleep(1.0)

  return hook if hang >= 0 else None


class NonFiniteBatches:
  """debug.nonfinite_batches (tests): the data iterator with every image NaN (same shapes, so the
  compiled step is reused), so each step's loss is non-finite."""

  def __init__(self, it):
    self.it = it

  def __next__(self):
    arrays, info = next(self.it)
    nan = {k: np.full_like(arrays[k], np.nan) for k in ("vit_patches", "vae_images")}
    return dict(arrays, **nan), info

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state) -> None:
    self.it.set_state(state)


def train_loop(r: Run, log: StepLog, stop: StopSignal, bar) -> int:
  """Steps from `r.start` to train.steps (or a SIGTERM); returns the last step. Updates `r.state`."""
  from bagel_jax import sharding as shd

  config = r.setup.config
  steps, hang = int(config.train.steps), int(config.debug.hang_after_step)
  meta = {"config": json.loads(config.to_json_best_effort()), "model": repr(r.model.cfg)}
  step_fn = batch_sh = None
  pending = None  # (step, metrics, info) of the step in flight
  step = r.start
  while step < steps:
    batch, info = next_batch(r.data_iter, r.hp.grad_accum_steps)
    gbatch = None
    if step_fn is None:
      t0 = time.time()
      step_fn, batch_sh = compile_step(r, batch)
      gbatch = shd.host_local_to_global(batch, batch_sh)
      if jax.process_count() > 1:  # every process compiled before the first collective runs
        step_fn.lower(r.state, r.vae_params, gbatch).compile()
        shd.barrier("first_step")
    gbatch = shd.host_local_to_global(batch, batch_sh) if gbatch is None else gbatch
    r.state, metrics = step_fn(r.state, r.vae_params, gbatch)
    if step == r.start:
      jax.block_until_ready(metrics)
      _log.info("first step (compile + run) took %.1fs", time.time() - t0)
      log.restart_clock()
    if pending is not None:
      log.finish(pending, r.state)
    step += 1
    pending = (step, metrics, info)
    bar.update(1)
    if r.ckpt.should_save(step) or stop.requested or step == steps or step == hang:
      log.finish(pending, r.state)
      pending = None
      r.ckpt.save(step, r.state, r.data_iter.get_state(), meta, force=True)
    if step == hang:
      _hang(r, step)
    if stop.requested:
      _log.warning("stopped by signal at step %d (checkpoint saved)", step)
      break
  if pending is not None:
    log.finish(pending, r.state)
  return step


# ----------------------------------------------------------------------------- the whole run
def run(config, workdir) -> dict:
  """The whole run (see the module docstring). Returns the last logged metrics (+ eval results)."""
  from tqdm import tqdm

  setup = prepare(config, workdir)  # refuses bad input before anything compiles
  workdir = setup.workdir
  workdir.mkdir(parents=True, exist_ok=True)
  _log.info("config and data checked (%d group(s): %s)", len(setup.group_names), ", ".join(setup.group_names))
  is_main = jax.process_index() == 0
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
  r = build_run(setup)
  steps = int(config.train.steps)
  writer = MetricsWriter(workdir, is_main, r.start)  # rows after the restored step are dropped
  bar = tqdm(total=steps, initial=r.start, desc="train", dynamic_ncols=True, disable=not is_main, mininterval=1.0)
  log = StepLog(r, writer, bar)
  with StopSignal() as stop:
    try:
      step = train_loop(r, log, stop, bar)
    finally:
      bar.close()
      r.ckpt.close()
      writer.close()

  result = dict(log.last)
  if config.eval.kind == "shapes" and not stop.requested and step >= steps:
    from bagel_jax.eval import shapes as shapes_eval
    state = r.state
    params = {"bagel": state.ema if (config.eval.use_ema and state.ema is not None) else state.params,
              "vae": r.vae_params}
    result["eval"] = shapes_eval.evaluate_shapes(r.model, params, setup.tokenizer, config, workdir)
  if is_main:
    (workdir / "result.json").write_text(json.dumps(result, indent=1, default=str))
  return result
