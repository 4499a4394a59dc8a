"""Per-target kernel tiles are read from the table; the 7B plan's search picks the least fitting change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from bagel_jax.aot import memplan
from bagel_jax.attention import pallas_gpu, pallas_tpu, target, tiles
from tests.test_attention_sharded import _abstract_mesh


def test_tpu_tiles_follow_the_mesh_generation(monkeypatch):
  monkeypatch.setitem(tiles.TPU, "v5e", tiles.TpuTiles(1024, 256, 384, 128))
  monkeypatch.setitem(tiles.TPU, "v6e", tiles.TpuTiles(256, 1024, 128, 512))
  with jax.sharding.use_abstract_mesh(_abstract_mesh("tpu", "TPU v5 lite")):
    bs = pallas_tpu.default_block_sizes(jnp.bfloat16)
  assert (bs.block_q, bs.block_k, bs.block_q_bwd, bs.block_k_bwd) == (1024, 256, 384, 128)
  bs = pallas_tpu.default_block_sizes(jnp.bfloat16, target.Device("tpu", "TPU v6 lite"))
  assert (bs.block_q, bs.block_k, bs.block_q_bwd, bs.block_k_bwd) == (256, 1024, 128, 512)
  bs = pallas_tpu.default_block_sizes(jnp.bfloat16, target.Device("tpu", "TPU v99"))  # unknown: the default
  assert bs.block_q == tiles.TPU_DEFAULT.block_q and bs.block_k_bwd == tiles.TPU_DEFAULT.block_k_bwd


def test_gpu_tiles_follow_compute_capability(monkeypatch):
  monkeypatch.setitem(tiles.GPU, 8.0, tiles.GpuTiles(64, 32, 32, 64, num_warps=4, num_stages=3))
  monkeypatch.setitem(tiles.GPU, 9.0, tiles.GpuTiles(256, 128, 128, 64))
  with jax.sharding.use_abstract_mesh(_abstract_mesh("gpu", "NVIDIA H100 80GB HBM3")):
    bs = pallas_gpu.default_block_sizes(jnp.bfloat16)
  assert (bs.block_q, bs.block_k, bs.block_q_bwd, bs.block_k_bwd) == (256, 128, 128, 64)
  a100 = target.Device("gpu", "NVIDIA A100-SXM4-80GB", 8.0)
  bs = pallas_gpu.default_block_sizes(jnp.bfloat16, a100)
  assert (bs.block_q, bs.block_k, bs.num_warps, bs.num_stages) == (64, 32, 4, 3)
  bs = pallas_gpu.default_block_sizes(jnp.bfloat16, target.Device("gpu", "NVIDIA L40S", 8.9))  # nearest lower: sm_80
  assert bs.block_q == 64
  bs = pallas_gpu.default_block_sizes(jnp.float32, a100)  # fp32 halves (not below 16)
  assert (bs.block_q, bs.block_k, bs.block_q_bwd, bs.block_k_bwd) == (32, 16, 16, 32)
  # B200 has its own entry (its compiler refuses sm_90's 128-row backward tiles), not the nearest lower one.
  bs = pallas_gpu.default_block_sizes(jnp.bfloat16, target.Device("gpu", "NVIDIA B200", 10.0))
  want = tiles.GPU[10.0]
  assert (bs.block_q_bwd, bs.block_k_bwd) == (want.block_q_bwd, want.block_k_bwd) != (128, 128)


GB = 10**9
BASE = memplan.Recipe(fsdp=8, tokens=36864, remat="full")


def _fake(state_gb: float, gb_per_1k_tokens: float, fixed_gb: float = 2.0):
  return lambda r: int((state_gb * 8 / r.fsdp + fixed_gb + gb_per_1k_tokens * r.tokens / 1024) * GB)


def test_plan_search_picks_the_least_fitting_change():
  # fits: no change
  assert [c.knob for c in memplan.fitting_changes(BASE, _fake(20, 1.0), 80 * GB)] == ["none"]
  # 30 + 2 + 36 = 68 GB > 60: fsdp 16 gives 15 + 38 = 53 (x2); 28,672 tokens give 60 (x1.29): tokens wins
  changes = memplan.fitting_changes(BASE, _fake(30, 1.0), 60 * GB)
  by = {c.knob: c for c in changes}
  assert set(by) == {"fsdp", "tokens", "fsdp+tokens"}  # remat is already `full`: nothing saves more
  assert by["fsdp"].recipe.fsdp == 16 and by["tokens"].recipe.tokens == 28 * 1024
  assert memplan.smallest(changes) is by["tokens"]
  # a large state: no token count fits (64 + 2 > 60), fsdp 32 does (16 + 2 + 36; fsdp 16 needs 70)
  changes = memplan.fitting_changes(BASE, _fake(64, 1.0), 60 * GB)
  assert [(c.knob, c.recipe.fsdp, c.cost) for c in changes[:1]] == [("fsdp", 32, 4.0)]
  # both together are cheaper: fsdp 16 (32 GB) with 26,624 tokens (x2 x 1.38 = x2.77 < x4)
  best = memplan.smallest(changes)
  assert (best.knob, best.recipe.fsdp, best.recipe.tokens) == ("fsdp+tokens", 16, 26 * 1024)
  # 40 GB: fsdp alone needs 256 (x32); together the cheapest is fsdp 32 with 22,528 tokens (x6.5)
  changes = memplan.fitting_changes(BASE, _fake(64, 1.0), 40 * GB)
  assert [(c.knob, c.recipe.fsdp, c.recipe.tokens) for c in changes] == [("fsdp", 256, 36864),
                                                                        ("fsdp+tokens", 32, 22 * 1024)]
  assert memplan.smallest(changes) is changes[1]
  # remat searched from a lighter policy: the least recomputing policy that fits
  light = memplan.Recipe(8, 8192, "none")
  extra = {"none": 40 * GB, "dots": 20 * GB, "save_attention_out": 5 * GB, "full": 0}
  changes = memplan.fitting_changes(light, lambda r: extra[r.remat] + 30 * GB, 52 * GB)
  assert changes[0].knob == "remat" and changes[0].recipe.remat == "dots"
  assert memplan.smallest(changes).recipe.remat == "dots"
  # nothing fits
  assert memplan.smallest(memplan.fitting_changes(BASE, lambda r: 100 * GB, 10 * GB)) is None


def test_memory_model_from_two_compiles():
  m = memplan.MemoryModel.from_compiles(BASE, total=70 * GB, sharded=30 * GB, total_at=(18432, 52 * GB))
  assert m.predict(BASE) == pytest.approx(70 * GB, abs=2)
  assert m.predict(memplan.Recipe(8, 18432, "full")) == pytest.approx(52 * GB, abs=2)
  assert m.predict(memplan.Recipe(16, 36864, "full")) == pytest.approx(55 * GB, abs=2)
  assert m.per_token == pytest.approx(18 * GB / 18432)


def test_plan_7b_rejects_an_unknown_target(capsys):
  from bagel_jax.aot.__main__ import main

  assert main(["plan-7b", "--target", "v9z:2x2"]) == 2
  assert "unknown target 'v9z:2x2'" in capsys.readouterr().err


OOM = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required for HLO "
       "temporaries (20.11G) exceeds available HBM (15.75G). HLO module: jit_fn.\nSee https://openxla.org/xla/errors")


def test_a_recipe_the_compiler_refuses_is_planned_from_smaller_compiles(monkeypatch):
  """v5e refuses the recipe at compile time (even 2 layers): the plan halves the tokens until the step
  compiles, fits the model there and predicts the recipe, saying what the compiler said."""
  from bagel_jax.aot import analysis, plan7b, runner

  assert runner.compile_oom(RuntimeError(OOM)).startswith("Ran out of memory on HBM")
  assert runner.compile_oom(RuntimeError("INVALID_ARGUMENT: bad shape")) is None
  state, per_token = 6 * GB, 0.5 * GB / 1024  # fsdp 8: state + gradients 6 GB per device

  def fake_compile(job, name, program="train"):
    tokens = job.mix.tokens
    if tokens > 9216:
      raise runner.CompileRefused(runner.compile_oom(RuntimeError(OOM)), 2)
    rep = analysis.CompileReport(seconds=1.0, argument=int(state / 1.25), output=0, alias=0,
                                 temp=int(state - state / 1.25 + 1 * GB + per_token * tokens), code=0, kernels=2,
                                 collectives={}, flops=None, bytes_accessed=None, memory_limit=16 * GB)
    return rep, (rep, rep), None

  monkeypatch.setattr(plan7b, "compile_total", fake_compile)
  lines = []
  row, _, rep, pair = plan7b.plan_target("v5e:2x4", lines.append)
  assert rep is None and pair is None and row.refused.startswith("Ran out of memory on HBM")
  assert any("at 18,432 tokens/device the compiler refuses" in ln for ln in lines)
  assert any("at 9,216 and 4,096 tokens/device" in ln for ln in lines)  # halves, rounded to 1,024
  # predicted at the recipe: 6 + 1 + 0.5 x 36 GB = 25 GB > 15.75 GiB; the best change cuts tokens to what fits
  assert row.total == pytest.approx(state + 1 * GB + per_token * 36864, rel=1e-6)
  assert row.best.knob == "tokens" and row.best.predicted <= row.memory
  assert "refused (Ran out of memory on HBM" in plan7b.plan_line(row) and "predicted" in plan7b.plan_line(row)
