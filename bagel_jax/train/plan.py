"""Memory and FLOPs plan of the sharded train step, compiled abstractly on fake CPU devices.

    python -m bagel_jax.train.plan --config configs/bagel_7b_mot.py --mesh fsdp=8[,tensor=N] \
        [--tokens 32768] [--remat full] [--layers K] [--step_time 12] [--peak_tflops 989]

No weights are made: the model, optimizer state and batch are ShapeDtypeStructs carrying
their NamedShardings, and `jit_train_step(...).lower(...).compile()` runs on as many fake
CPU devices as the mesh needs (XLA_FLAGS is set before JAX starts). It prints, per device:
parameters, optimizer state and EMA (exact, from the shardings), the compiler's argument,
output and temporary (activations, gradients, workspace) bytes from
`compiled.memory_analysis()`, and the total; then FLOPs per step and the MFU a step time means.

- Each row of the global batch holds `--tokens` packed tokens (upstream packs 32k tokens per
  GPU); the batch has one row per (data x fsdp) shard. A row is a representative mix: some
  generation samples (caption + noisy VAE image), understanding samples (ViT image + answer
  with CE) and plain text; see `row_plans`.
- `--layers K` compiles K and 2K decoder layers instead of the full depth and extrapolates the
  temporary memory linearly per layer (the scan makes it linear); the output says so.
- FLOPs: XLA's cost analysis counts a while-loop body once, so the per-layer cost is measured
  with models of 1 and 0 decoder layers (a scan of length 1 is inlined) and scaled to the
  full depth; both the compiled count (including remat recomputation) and the model FLOPs
  (6 x active matmul params x tokens + attention; upstream's MFU basis) are printed.
- CPU buffer assignment stands in for the GPU/TPU one: figures are estimates (+/- 10%).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys
import time
from typing import Any

GIB = 1024**3


def _load_config(path: str | None):
  if path is None:
    return None
  spec = importlib.util.spec_from_file_location("plan_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _get(cfg, *paths: str, default=None):
  """The first of `paths` ("a.b.c") found in an ml_collections config, else default."""
  if cfg is None:
    return default
  for p in paths:
    node = cfg
    ok = True
    for k in p.split("."):
      try:
        node = node[k] if k in node else getattr(node, k)
      except (AttributeError, KeyError, TypeError):
        ok = False
        break
    if ok and node is not None:
      return node
  return default


@dataclasses.dataclass(frozen=True)
class RowMix:
  tokens: int = 32768
  gen_images: int = 4  # noisy VAE images per row (generation targets)
  gen_side: int = 512  # pixels
  und_images: int = 4  # ViT images per row
  und_side: int = 448  # pixels
  ce_tokens: int = 8192  # text tokens with CE loss per row
  caption: int = 64


def add_row_mix_args(ap: argparse.ArgumentParser) -> None:
  """--gen_images, --gen_side, --und_images, --und_side, --ce_tokens (the row mix; --tokens is separate)."""
  for name in ("gen_images", "gen_side", "und_images", "und_side", "ce_tokens"):
    ap.add_argument(f"--{name}", type=int, default=getattr(RowMix, name))


def row_mix_from_args(a, config) -> RowMix:
  tokens = a.tokens or int(_get(config, "data.capacity.tokens", default=32768))
  return RowMix(tokens=tokens, gen_images=a.gen_images, gen_side=a.gen_side, und_images=a.und_images,
                und_side=a.und_side, ce_tokens=a.ce_tokens)


def row_plans(mix: RowMix, cfg) -> list:
  """One row's samples: generation (caption + noisy image), understanding (image + answer), text fill."""
  from bagel_jax import layout as L

  g = mix.gen_side // cfg.latent_downsample
  v = mix.und_side // cfg.vit.patch_size
  ids = lambda n: [1] * n
  samples, used, ce = [], 0, 0
  for _ in range(mix.gen_images):
    s = [L.Text(ids(mix.caption)), L.VaeImage((g, g), loss=True)]
    samples.append(s)
    used += L.plan_num_tokens(s)
  per_answer = mix.ce_tokens // max(mix.und_images, 1) - 1 if mix.und_images else 0
  for _ in range(mix.und_images):
    s = [L.VitImage((v, v)), L.Text(ids(max(per_answer, 1)), loss=True)]
    samples.append(s)
    used += L.plan_num_tokens(s)
    ce += max(per_answer, 1) + 1
  rest = mix.tokens - used - 2
  if rest < 0:
    raise ValueError(f"the row mix needs {used} tokens, more than --tokens {mix.tokens}")
  if rest > 0:
    left_ce = max(mix.ce_tokens - ce, 0)
    if left_ce and rest > 1:
      n = min(left_ce - 1, rest - 2)
      samples.append([L.Text(ids(max(n, 1)), loss=True)])
      rest -= max(n, 1) + 2
    if rest > 0:
      samples.append([L.Text(ids(rest))])
  return samples


def packed_row(mix: RowMix, cfg):
  """The packed numpy Layout of one row of `mix` for model config `cfg` (ValueError if it does not fit)."""
  from bagel_jax import layout as L

  plans = row_plans(mix, cfg)
  nl = mix.gen_images * (mix.gen_side // cfg.latent_downsample) ** 2
  cap = L.Capacity(tokens=mix.tokens, gen=max(nl, 1), und=mix.tokens - nl)
  return L.pack([plans], cap, cfg.tokens, **L.position_args(cfg))


def abstract_batch(model, mix: RowMix, rows: int):
  """(ShapeDtypeStructs of a TrainBatch of `rows` identical rows, the packed numpy Layout of one row)."""
  import jax
  import numpy as np

  from bagel_jax import layout as L
  from bagel_jax.train.step import TrainBatch

  cfg = model.cfg
  packed = packed_row(mix, cfg)
  lay = jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows,) + np.shape(x)[1:], np.asarray(x).dtype), packed)
  nv = lay.vit_indexes.shape[1]
  ni = lay.vae_image_noisy.shape[1]
  side = mix.gen_side
  return TrainBatch(layout=lay,
                    vit_patches=jax.ShapeDtypeStruct((rows, nv, cfg.vit.patch_dim), np.float32),
                    vae_images=jax.ShapeDtypeStruct((rows, ni, side, side, 3), np.float32)), packed


def _bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  import jax
  import numpy as np

  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
  return total


def visible_pairs(lay, row: int = 0, block: int = 1024) -> int:
  """Exact number of visible (query, key) pairs of one row of a (numpy) layout."""
  import numpy as np

  ks, ke, qs, qe = (np.asarray(getattr(lay, n))[row] for n in ("k_start", "k_end", "q_start", "q_end"))
  t = ks.shape[0]
  kidx = np.arange(t)
  total = 0
  for a in range(0, t, block):
    q = np.arange(a, min(a + block, t))[:, None]
    vis = (ks[q] <= kidx) & (kidx < ke[q]) & (qs[None, :] <= q) & (q < qe[None, :])
    total += int(vis.sum())
  return total


def model_flops(cfg, lay, rows: int) -> dict[str, float]:
  """Model FLOPs per step (forward + backward = 3 x forward; no remat), from the layout's token sets."""

  llm, vit = cfg.llm, cfg.vit
  d, f, hd = llm.hidden_size, llm.intermediate_size, llm.head_dim
  hq, hk = llm.num_attention_heads, llm.num_key_value_heads
  t = int(lay.token_kind.shape[1])
  pairs = visible_pairs(lay)
  per_tok_layer = 2 * (d * hq * hd + 2 * d * hk * hd + hq * hd * d + 3 * d * f)  # one expert per token
  attn = 4 * pairs * hq * hd  # QK^T and PV over the visible (query, key) pairs
  llm_fwd = llm.num_hidden_layers * (t * per_tok_layer + attn)
  nc = int(lay.ce_indexes.shape[1])
  head = 2 * nc * d * llm.vocab_size
  nv = int(lay.vit_indexes.shape[1])
  vd, vf = vit.hidden_size, vit.intermediate_size
  vit_fwd = vit.num_hidden_layers * nv * 2 * (4 * vd * vd + 2 * vd * vf)
  fwd = rows * (llm_fwd + head + vit_fwd)
  return {"model_flops": 3.0 * fwd, "llm_attention_share": rows * 3 * llm.num_hidden_layers * attn / (3 * fwd)}


def largest_buffers(compiled, n: int = 12) -> list[tuple[int, str, str]]:
  """The n largest per-device arrays in the optimized HLO (diagnostics; not all live at once)."""
  import re

  itemsize = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8,
              "s64": 8, "u64": 8}
  pat = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\(")
  seen, out = set(), []
  for line in compiled.as_text().splitlines():
    m = pat.match(line)
    if not m or m.group(1) not in itemsize:
      continue
    dims = [int(x) for x in m.group(2).split(",") if x]
    nbytes = itemsize[m.group(1)] * math.prod(dims)
    op = re.search(r'op_name="([^"]+)"', line)
    where = op.group(1)[-90:] if op else ""
    key = (m.group(1), m.group(2), where)
    if key in seen:
      continue
    seen.add(key)
    out.append((nbytes, f"{m.group(1)}[{m.group(2)}] {m.group(3)}", where))
  out.sort(key=lambda x: -x[0])
  return out[:n]


def _compile(model, tx, hp, mesh, rules, abstract_state, batch, vae, compiler_options=None):

  from bagel_jax import sharding as shd
  from bagel_jax.train.step import jit_train_step

  ss = shd.train_state_shardings(abstract_state, mesh, rules)
  bs = shd.batch_shardings(batch, mesh, rules)
  vs = shd.replicated(vae, mesh)
  step = jit_train_step(model, tx, hp, mesh, rules, ss, bs, vs, compiler_options=compiler_options)
  args = (shd.abstract_with_shardings(abstract_state, ss), shd.abstract_with_shardings(vae, vs),
          shd.abstract_with_shardings(batch, bs))
  t0 = time.time()
  lowered = step.lower(*args)
  compiled = lowered.compile()
  return compiled, time.time() - t0, args


def _with_layers(cfg, n: int):
  return cfg.replace(llm=dataclasses.replace(cfg.llm, num_hidden_layers=n))


def model_config_or_preset(config, out=print):
  """(BagelConfig, its name) of a training config; the bagel_7b_mot preset if its release folder is absent."""
  import pathlib

  from bagel_jax import config as C
  from bagel_jax.train.config import model_config

  ckpt = _get(config, "model.checkpoint", default="") or _get(config, "init.hf.llm", default="")
  if ckpt and not pathlib.Path(ckpt).is_dir():
    # The release folder is not needed to compile: its configs are the bagel_7b_mot preset.
    out(f"plan: {ckpt!r} (model.checkpoint or init.hf.llm) is not here; using the bagel_7b_mot preset "
        "(the release's configs)")
    return C.bagel_7b_mot(), "bagel_7b_mot"
  return model_config(config), ckpt or _get(config, "model.preset", default="?")


def train_parts(cfg, config, *, attention: str, remat: str, mix: RowMix, rows: int, param_dtype, dtype,
                grad_accum_steps: int = 1):
  """(model, tx, hp, abstract state, abstract batch, packed layout of a row, abstract VAE params) of the
  train step, with the optimizer, loss weights, EMA and frozen tables of `config` (defaults without one)."""
  import jax
  import optax

  from bagel_jax.api import BagelModel
  from bagel_jax.train.step import StepConfig, init_train_state

  ema_decay = float(_get(config, "train.ema_decay", default=0.9999)) or None
  model = BagelModel(cfg, param_dtype=param_dtype, dtype=dtype, attention_impl=attention, remat=remat)
  params = model.abstract_params()
  optim_cfg = _get(config, "optim")
  if optim_cfg is not None:
    from bagel_jax.train.optim import frozen_patterns, make_optimizer
    tx, _ = make_optimizer(optim_cfg, params["bagel"], int(_get(config, "train.steps", default=1000)))
    frozen = frozen_patterns(optim_cfg)
  else:
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-15))
    from bagel_jax.train.step import FROZEN_TABLES as frozen
  hp = StepConfig(ce_weight=float(_get(config, "train.ce_weight", default=1.0)),
                  mse_weight=float(_get(config, "train.mse_weight", default=1.0)),
                  timestep_shift=float(_get(config, "train.timestep_shift", default=1.0)),
                  ema_decay=ema_decay, frozen=tuple(frozen), grad_accum_steps=grad_accum_steps)
  state = jax.eval_shape(lambda p: init_train_state(p, tx, jax.random.key(0), ema_decay is not None),
                         params["bagel"])
  batch, lay = abstract_batch(model, mix, rows)
  return model, tx, hp, state, batch, lay, params["vae"]


@dataclasses.dataclass(frozen=True)
class PlanSetup:
  """What every compile of one plan shares: the model config, dtypes, sharding and batch rows."""
  config: Any
  cfg: Any
  preset: str
  remat: str
  attention: str
  param_dtype: Any
  dtype: Any
  ema_on: bool
  rules: Any
  mesh: Any
  accum: int
  rows: int
  mix: RowMix
  compiler_options: dict | None

  @property
  def full_layers(self) -> int:
    return self.cfg.llm.num_hidden_layers

  def build(self, n_layers: int, attn: str):
    return train_parts(_with_layers(self.cfg, n_layers), self.config, attention=attn, remat=self.remat, mix=self.mix,
                       rows=self.rows, param_dtype=self.param_dtype, dtype=self.dtype, grad_accum_steps=self.accum)

  def compile(self, n_layers: int, attn: str):
    m, tx, hp, state, batch, _, vae = self.build(n_layers, attn)
    compiled, secs, _ = _compile(m, tx, hp, self.mesh, self.rules, state, batch, vae, self.compiler_options)
    return compiled, secs


def plan_setup(config, mesh_spec: str, preset: str | None, mix: RowMix, remat: str | None, attention: str | None,
               rows_per_shard: int, grad_accum_steps: int | None, compiler_options: dict | None, out) -> PlanSetup:
  import jax.numpy as jnp

  from bagel_jax import config as C
  from bagel_jax import sharding as shd

  if preset is not None or config is None:
    preset = preset or "bagel_7b_mot"
    cfg = getattr(C, preset)()
  else:
    cfg, preset = model_config_or_preset(config, out)
  attention = attention or "flash_xla"
  if attention in ("auto", "pallas_gpu", "pallas_tpu", "cudnn"):
    attention = "flash_xla"  # the kernels cannot compile for CPU; this has their memory profile
  overrides = _get(config, "train.sharding_rules", default=None)  # as the trainer applies them
  rules = shd.rules_with(overrides.to_dict() if hasattr(overrides, "to_dict") else overrides)
  mesh = shd.make_mesh(mesh_spec)
  accum = int(grad_accum_steps or _get(config, "train.grad_accum_steps", default=1))
  return PlanSetup(config=config, cfg=cfg, preset=preset, remat=remat or _get(config, "model.remat", default="full"),
                   attention=attention, param_dtype=jnp.dtype(_get(config, "model.param_dtype", default="float32")),
                   dtype=jnp.dtype(_get(config, "model.dtype", default="bfloat16")),
                   ema_on=bool(float(_get(config, "train.ema_decay", default=0.9999))), rules=rules, mesh=mesh,
                   accum=accum, rows=rows_per_shard * shd.batch_shards(mesh, rules) * accum, mix=mix,
                   compiler_options=compiler_options)


def _describe_setup(s: PlanSetup, out) -> None:
  from bagel_jax import sharding as shd
  out(f"plan: {s.preset}, mesh {shd.describe(s.mesh)} ({s.mesh.size} fake CPU devices), {s.rows} rows x "
      f"{s.mix.tokens} tokens, remat={s.remat}, attention={s.attention}, params {s.param_dtype.name} / compute "
      f"{s.dtype.name}, EMA {'on' if s.ema_on else 'off'}"
      + (f", {s.accum} accumulated micro-batches of {s.rows // s.accum} rows (activations of one)"
         if s.accum > 1 else ""))


def state_bytes(s: PlanSetup, parts, out) -> dict[str, int]:
  """Exact per-device bytes of the parameters, optimizer state, EMA, VAE and batch at full depth (no compile)."""
  from bagel_jax import sharding as shd
  _, _, _, state, batch, lay, vae = parts
  st = shd.abstract_with_shardings(state, shd.train_state_shardings(state, s.mesh, s.rules))
  b = {"params": _bytes_per_device(st.params), "optimizer": _bytes_per_device(st.opt_state),
       "ema": _bytes_per_device(st.ema) if st.ema is not None else 0,
       "vae": _bytes_per_device(shd.abstract_with_shardings(vae, shd.replicated(vae, s.mesh))),
       "batch": _bytes_per_device(shd.abstract_with_shardings(batch, shd.batch_shardings(batch, s.mesh, s.rules)))}
  nl = int(lay.vae_indexes.shape[1]); nv = int(lay.vit_indexes.shape[1]); nc = int(lay.ce_indexes.shape[1])
  mix = s.mix
  out(f"row: {mix.tokens} tokens = {nl} VAE latent tokens ({mix.gen_images} images {mix.gen_side}px), "
      f"{nv} ViT tokens ({mix.und_images} images {mix.und_side}px), {nc} CE tokens, rest text")
  return b


def memory_full_depth(s: PlanSetup, parts, top: int, out) -> tuple[dict[str, int], str]:
  """The compiler's argument, output, aliased and temporary bytes of the full-depth step."""
  model, tx, hp, state, batch, _, vae = parts
  compiled, secs, _ = _compile(model, tx, hp, s.mesh, s.rules, state, batch, vae, s.compiler_options)
  ma = compiled.memory_analysis()
  m = {"arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
       "aliased": ma.alias_size_in_bytes, "activations_and_temps": ma.temp_size_in_bytes}
  for nbytes, what, where in largest_buffers(compiled, top) if top else ():
    out(f"  [largest] {nbytes / GIB:7.2f} GiB  {what}  {where}")
  return m, f"compiled at full depth ({s.full_layers} layers) in {secs:.0f} s"


def memory_extrapolated(s: PlanSetup, layers: int, b: dict[str, int]) -> tuple[dict[str, int], str]:
  """Temporaries from K and 2K layer compiles scaled linearly to full depth; arguments and outputs exact."""
  k1, k2 = max(layers, 2), 2 * max(layers, 2)  # a 1-layer scan is inlined: not on the line
  (m1, s1), (m2, s2) = ((c.memory_analysis(), secs) for c, secs in (s.compile(k, s.attention) for k in (k1, k2)))
  per_layer = (m2.temp_size_in_bytes - m1.temp_size_in_bytes) / (k2 - k1)
  state = b["params"] + b["optimizer"] + b["ema"]
  m = {"arguments": state + b["vae"] + b["batch"] + 5 * 8, "outputs": state + 64, "aliased": state + 64,
       "activations_and_temps": int(m1.temp_size_in_bytes + per_layer * (s.full_layers - k1))}
  return m, (f"EXTRAPOLATED: compiled with {k1} and {k2} decoder layers ({s1:.0f} s, {s2:.0f} s), "
             f"temporaries scaled linearly to {s.full_layers} layers ({per_layer / GIB:.2f} GiB per layer)")


def report_memory(fig: dict, how: str, param_dtype, out) -> None:
  out(f"memory per device ({how}):")
  out(f"  parameters      {fig['params'] / GIB:8.2f} GiB  (trainable bagel tree, {param_dtype.name})")
  out(f"  optimizer       {fig['optimizer'] / GIB:8.2f} GiB")
  out(f"  EMA             {fig['ema'] / GIB:8.2f} GiB")
  out(f"  VAE (frozen)    {fig['vae'] / GIB:8.2f} GiB  (replicated)")
  out(f"  batch           {fig['batch'] / GIB:8.2f} GiB")
  out(f"  arguments       {fig['arguments'] / GIB:8.2f} GiB  (memory_analysis; donated state is aliased to the outputs)")
  out(f"  temporaries     {fig['activations_and_temps'] / GIB:8.2f} GiB  (activations, gradients, workspace)")
  out(f"  total           {fig['total'] / GIB:8.2f} GiB  = arguments + outputs - aliased + temporaries")
  out(f"  fits in 80 GB:  {'yes' if fig['fits_80gb'] else 'NO'} ({fig['total'] / 1e9:.1f} GB)")


def flops_report(s: PlanSetup, lay, step_time: float | None, peak_tflops: float, out) -> dict[str, float]:
  """Compiled (XLA) and model FLOPs per step per device, and the MFU a step time means."""
  # XLA counts a while body once: measure 0- and 1-layer models and scale per layer.
  fl = []
  for k in (0, 1):
    ca = s.compile(k, "reference")[0].cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    fl.append(float(ca.get("flops", 0.0)))
  xla_dev = fl[0] + s.full_layers * (fl[1] - fl[0])
  mf = model_flops(s.cfg, lay, s.rows)
  per_dev_model = mf["model_flops"] / s.mesh.size
  fig = dict(xla_flops_per_device=xla_dev, model_flops_per_device=per_dev_model)
  out(f"FLOPs per step per device: compiled {xla_dev / 1e12:.1f} TFLOP (XLA cost analysis with dense "
      f"attention and remat recomputation; layer cost from 0/1-layer compiles x {s.full_layers}); "
      f"model {per_dev_model / 1e12:.1f} TFLOP (6 x active matmul params x tokens + exact visible attention pairs, "
      f"attention share {mf['llm_attention_share']:.0%})")
  if step_time:
    fig["mfu"] = mfu = per_dev_model / (step_time * peak_tflops * 1e12)
    out(f"MFU at {step_time:g} s/step and {peak_tflops:g} TFLOP/s peak: {mfu:.1%} "
        f"(model FLOPs; {s.mix.tokens * s.rows / step_time / s.mesh.size:.0f} tokens/s/device)")
  else:
    for st_ in (5.0, 10.0, 20.0):
      out(f"  MFU at {st_:4.1f} s/step ({peak_tflops:g} TFLOP/s peak): {per_dev_model / (st_ * peak_tflops * 1e12):.1%}")
  return fig


def plan(config=None, mesh_spec: str = "fsdp=8", *, preset: str | None = None, mix: RowMix = RowMix(),
         remat: str | None = None, layers: int | None = None, attention: str | None = None,
         step_time: float | None = None, peak_tflops: float = 989.0, rows_per_shard: int = 1,
         flops: bool = True, top: int = 0, compiler_options: dict | None = None, out=print,
         grad_accum_steps: int | None = None) -> dict[str, Any]:
  """Compiles the train step abstractly and returns (and prints) the per-device figures: state
  bytes, the compiler's memory (at full depth, or extrapolated from `layers` and 2 x `layers`),
  and FLOPs.

  With gradient accumulation (`grad_accum_steps`, default the config's train.grad_accum_steps) a
  step holds that many micro-batches of rows_per_shard rows per shard."""
  s = plan_setup(config, mesh_spec, preset, mix, remat, attention, rows_per_shard, grad_accum_steps,
                 compiler_options, out)
  _describe_setup(s, out)
  parts = s.build(s.full_layers, s.attention)
  fig: dict[str, Any] = state_bytes(s, parts, out)
  if layers is None or layers >= s.full_layers:
    mem, how = memory_full_depth(s, parts, top, out)
  else:
    mem, how = memory_extrapolated(s, layers, fig)
  fig.update(mem)
  fig["total"] = fig["arguments"] + fig["outputs"] - fig["aliased"] + fig["activations_and_temps"]
  fig["fits_80gb"] = fig["total"] <= 80e9
  report_memory(fig, how, s.param_dtype, out)
  if flops:
    fig.update(flops_report(s, parts[5], step_time, peak_tflops, out))
  return fig


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m bagel_jax.train.plan", description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default=None, help="an ml_collections config file with get_config()")
  ap.add_argument("--mesh", default="fsdp=8", help="e.g. fsdp=8 or data=2,fsdp=4,tensor=2")
  ap.add_argument("--preset", default=None, help="a bagel_jax.config preset instead of the config's model "
                  "(bagel_7b_mot, bagel_tiny)")
  ap.add_argument("--tokens", type=int, default=None,
                  help="packed tokens per row (default: the config's data.capacity.tokens, else 32768)")
  ap.add_argument("--rows_per_shard", type=int, default=1)
  ap.add_argument("--grad_accum_steps", type=int, default=None,
                  help="micro-batches per step (default: the config's train.grad_accum_steps, else 1)")
  add_row_mix_args(ap)
  ap.add_argument("--remat", default=None, help="remat policy (default: the config's model.remat, else 'full')")
  ap.add_argument("--attention", default=None,
                  help="attention impl for the memory compile (default flash_xla: a flash-style XLA stand-in "
                       "with the Pallas kernels' residuals; xla_chunked to see that backend)")
  ap.add_argument("--layers", type=int, default=None, help="compile K and 2K layers and extrapolate")
  ap.add_argument("--step_time", type=float, default=None, help="seconds per step, for the MFU")
  ap.add_argument("--peak_tflops", type=float, default=989.0, help="per-device peak (H100 bf16 dense 989, A100 312)")
  ap.add_argument("--no_flops", action="store_true")
  ap.add_argument("--top", type=int, default=0, help="also list the N largest per-device HLO arrays")
  a = ap.parse_args(argv)

  # Fake devices: must be set before JAX initialises its backends.
  sizes = [int(p.split("=")[1]) for p in a.mesh.split(",") if "=" in p]
  n = math.prod(s for s in sizes if s > 0)
  os.environ["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
  if "jax" in sys.modules:
    import jax
    if jax.device_count() < n:
      print(f"plan: JAX already started with {jax.device_count()} devices; run it in a fresh process", file=sys.stderr)
      return 2

  config = _load_config(a.config)
  mix = row_mix_from_args(a, config)
  fig = plan(config, a.mesh, preset=a.preset, mix=mix, remat=a.remat, layers=a.layers, attention=a.attention,
             step_time=a.step_time, peak_tflops=a.peak_tflops, rows_per_shard=a.rows_per_shard,
             flops=not a.no_flops, top=a.top, grad_accum_steps=a.grad_accum_steps)
  return 0 if fig["fits_80gb"] else 1


if __name__ == "__main__":
  sys.exit(main())
