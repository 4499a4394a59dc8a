"""TaylorSeer step caching: parity with upstream's recorded run (cases_taylorseer.npz, CASES.md), a fresh
cache per request, one compilation per size, the command line's settings, refused settings."""

import json

import numpy as np
import pytest

from bagel_jax.api import BagelModel
from bagel_jax.config import load_config
from bagel_jax.inference import ImageInput, InferenceError, Inferencer, flow
from bagel_jax.inference.taylorseer import TaylorSeerSettings
from tests.conftest import FIXTURE_DIR, rel_err

TOL = 1e-4  # CASES.md: max(1e-4, 10 x the float32 noise floor (<= 3.3e-6))
GROUPS = ("t2i", "edit", "t2i_late_cfg")
BRANCH_KEYS = ("v_cond", "v_uncond_text", "v_uncond_img")


@pytest.fixture(scope="module")
def ts_cases():
  with np.load(FIXTURE_DIR / "cases_taylorseer.npz") as d:
    return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def inf():
  cfg = load_config(FIXTURE_DIR)
  model = BagelModel(cfg, attention_impl="reference")
  return Inferencer(model, model.load_upstream(FIXTURE_DIR), None)


def _request(group, cases, ts_cases):
  """(items, keyword arguments) of a recorded group: cases.npz inputs, cases.json settings, its own grid and interval."""
  src = "edit" if group == "edit" else "t2i"
  s = json.loads((FIXTURE_DIR / "cases.json").read_text())[src]
  kw = dict(num_timesteps=len(ts_cases[f"{group}/timesteps"]), timestep_shift=s["timestep_shift"],
            cfg_text_scale=s["cfg_text_scale"], cfg_img_scale=s["cfg_img_scale"],
            cfg_interval=tuple(float(v) for v in ts_cases[f"{group}/cfg_interval"]),
            cfg_renorm_type=s["cfg_renorm_type"], cfg_renorm_min=s["cfg_renorm_min"],
            init_noise=[cases[f"{src}/init_noise"]], output="array")
  if src == "edit":
    image = ImageInput(vae=cases["edit/image"].transpose(1, 2, 0), vit=cases["edit/vit_image"].transpose(1, 2, 0),
                       vae_eps=cases["edit/vae_eps"][0].transpose(1, 2, 0))
    return [image, cases["edit/instruction_ids"].tolist()], kw
  return [cases["t2i/prompt_ids"].tolist()], dict(kw, image_shapes=tuple(s["image_shape"]))


def _taylor_kw(ts_cases):
  """Upstream's recorded cache_init values."""
  return dict(enable_taylorseer=True, fresh_threshold=int(ts_cases["taylorseer/fresh_threshold"]),
              max_order=int(ts_cases["taylorseer/max_order"]), first_enhance=int(ts_cases["taylorseer/first_enhance"]))


_RUNS: dict = {}


def _run(inf, cases, ts_cases, group, cached):
  if (group, cached) not in _RUNS:
    items, kw = _request(group, cases, ts_cases)
    [img] = inf.interleave_inference(items, record=True, **kw, **(_taylor_kw(ts_cases) if cached else {}))
    _RUNS[(group, cached)] = (img, inf.last["groups"][0])
  return _RUNS[(group, cached)]


@pytest.mark.parametrize("group", GROUPS)
def test_schedule_per_branch(inf, cases, ts_cases, group):
  """Which calls are full and which forecast, each branch's own counter and factor count: exactly upstream's."""
  _, g = _run(inf, cases, ts_cases, group, True)
  kind, step, terms = g["taylor"]
  c = kind.shape[1]
  for name, ours in (("step_type", kind), ("branch_step", step), ("n_terms", terms)):
    ref = ts_cases[f"{group}/taylor/{name}"]
    np.testing.assert_array_equal(ours, ref[:, :c], err_msg=name)
    assert (ref[:, c:] <= 0).all()  # a branch the sampler does not stack never ran upstream either


@pytest.mark.parametrize("group", GROUPS)
def test_velocities_and_final_latent(inf, cases, ts_cases, group):
  for cached, name in ((True, "taylor"), (False, "plain")):
    _, g = _run(inf, cases, ts_cases, group, cached)
    if cached or f"{group}/plain/velocities" in ts_cases:  # the late-CFG group records the plain latent only
      assert rel_err(g["velocities"][:, 0], ts_cases[f"{group}/{name}/velocities"]) < TOL, name
    assert rel_err(g["final_latent"][0], ts_cases[f"{group}/{name}/final_latent"]) < TOL, name


@pytest.mark.parametrize("group", ["t2i", "edit"])
def test_branch_outputs(inf, cases, ts_cases, group):
  """Each branch's llm2vae output at every step, full or forecast (zeros where the branch did not run)."""
  _, g = _run(inf, cases, ts_cases, group, True)
  checked = 0
  for j, name in enumerate(BRANCH_KEYS):
    if f"{group}/taylor/{name}" in ts_cases:
      assert rel_err(g["raw"][:, j], ts_cases[f"{group}/taylor/{name}"]) < TOL, name
      checked += 1
  assert checked == g["raw"].shape[1]


@pytest.mark.parametrize("group", ["t2i", "edit"])
def test_decoded_images(inf, cases, ts_cases, group):
  for cached, name in ((True, "taylor"), (False, "plain")):
    img, g = _run(inf, cases, ts_cases, group, cached)
    assert rel_err(g["decoded"][0].transpose(2, 0, 1), ts_cases[f"{group}/{name}/decoded"][0]) < TOL, name
    ref = ts_cases[f"{group}/{name}/image_u8"]
    assert img.dtype == np.uint8 and img.shape == ref.shape
    # A truncating cast: exact, except where upstream's float value lies within 1e-3 of a level
    # boundary (float32 noise may flip those by one level).
    level = np.clip(ts_cases[f"{group}/{name}/decoded"][0].transpose(1, 2, 0) * 0.5 + 0.5, 0, 1) * 255
    edge = np.abs(level - np.round(level)) < 1e-3
    diff = np.abs(img.astype(int) - ref)
    assert diff[~edge].max() == 0 and diff.max() <= 1, name


def test_every_request_starts_fresh(inf, cases, ts_cases):
  """Cached requests in a row (another one in between) give what each gives alone."""
  alone = _run(inf, cases, ts_cases, "t2i", True)[1]["final_latent"]
  _run(inf, cases, ts_cases, "edit", True)
  for _ in range(2):
    items, kw = _request("t2i", cases, ts_cases)
    inf.interleave_inference(items, record=True, **kw, **_taylor_kw(ts_cases))
    np.testing.assert_array_equal(inf.last["groups"][0]["final_latent"], alone)


def test_one_compilation_for_two_prompts(inf):
  """Two prompts of one size: one trace of the cached loop (settings no other test uses, so the first call traces)."""
  kw = dict(num_timesteps=9, cfg_text_scale=4.0, cfg_img_scale=1.0, image_shapes=(16, 24), output="array",
            enable_taylorseer=True, fresh_threshold=4, max_order=2, first_enhance=3)
  before = flow.TRACE_COUNT["denoise"]
  inf.interleave_inference([[3, 4, 5, 6]], **kw)
  first = flow.TRACE_COUNT["denoise"]
  inf.interleave_inference([[7, 8, 9, 10, 11, 12]], **kw)
  assert (first - before, flow.TRACE_COUNT["denoise"] - first) == (1, 0)


@pytest.mark.parametrize("bad,field", [(dict(fresh_threshold=0), "fresh_threshold"), (dict(max_order=-1), "max_order"),
                                       (dict(first_enhance=0), "first_enhance"), (dict(max_order=2.5), "max_order"),
                                       (dict(taylorseer_mode="fast"), "mode"),
                                       (dict(fresh_tolerance=-0.1), "fresh_tolerance")])
def test_bad_settings_refused(inf, bad, field):
  with pytest.raises(InferenceError) as e:
    inf.interleave_inference([[3, 4]], num_timesteps=3, image_shapes=(16, 16), enable_taylorseer=True, **bad)
  assert field in str(e.value) and "\n" not in str(e.value)


def test_defaults_are_upstreams():
  s = TaylorSeerSettings()
  assert (s.fresh_threshold, s.max_order, s.first_enhance, s.mode, s.fresh_tolerance) == (3, 6, 5, "upstream", 0.0)


def test_cli_settings_reach_the_sampler(tmp_path, monkeypatch, capsys):
  from bagel_jax.inference import generate
  common = ["--checkpoint", str(FIXTURE_DIR), "--tokenizer", str(FIXTURE_DIR.parent / "tokenizer" / "tokenizer.json"),
            "--prompt", "a red cat", "--size", "16x24", "--steps", "5", "--no-progress", "--out", str(tmp_path / "o.png")]
  seen, real = [], flow.denoise

  def spy(*a, **kw):
    seen.append(kw.get("taylorseer"))
    return real(*a, **kw)

  monkeypatch.setattr(flow, "denoise", spy)
  assert generate.main(common) == 0
  assert generate.main(common + ["--enable-taylorseer"]) == 0
  assert generate.main(common + ["--enable-taylorseer", "--fresh-threshold", "4", "--max-order", "2", "--first-enhance",
                                 "3", "--taylorseer-mode", "flow_time", "--fresh-tolerance", "0.05"]) == 0
  assert seen == [None, TaylorSeerSettings(), TaylorSeerSettings(4, 2, 3, "flow_time", 0.05)]
  capsys.readouterr()
  assert generate.main(common + ["--enable-taylorseer", "--max-order", "-1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: TaylorSeer max_order") and "\n" not in err
  assert len(seen) == 3  # refused before any sampling


def test_sharded_sampler(inf, cases, ts_cases):
  """Inferencer(mesh=...) runs the cached loop through jit_denoise: upstream's image (8 devices, fsdp x tensor)."""
  from bagel_jax import sharding as shd
  sharded = Inferencer(inf.model, inf.params, None, mesh=shd.make_mesh("fsdp=4,tensor=2"))
  items, kw = _request("t2i", cases, ts_cases)
  [img] = sharded.interleave_inference(items, **kw, **_taylor_kw(ts_cases))
  assert len(sharded._samplers) == 1 and next(iter(sharded._samplers))[1][-1] == ("taylorseer", TaylorSeerSettings())
  assert np.abs(img.astype(int) - ts_cases["t2i/taylor/image_u8"]).max() <= 1


def test_bench_counts_and_refusals(tmp_path, capsys):
  """`python -m bagel_jax.bench taylorseer`: forward counts from the recorded schedule; a bad variant gets one line."""
  from bagel_jax.bench import taylorseer as bench
  out = tmp_path / "ts.json"
  assert bench.main(["--config", "tiny", "--size", "16x24", "--steps", "9", "--repeat", "1",
                     "--variants", "upstream", "flow_time:1", "--out", str(out)]) == 0
  rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
  # 8 Euler steps, CFG at the 7 with t > 0.4: 15 uncached branch forwards; upstream: cond full at calls
  # 0-4 and 7 (6), cfg_text at 0-4 (5).  fresh_threshold 1: every call full, the uncached result.
  assert (rows["uncached"]["full_forwards"], rows["upstream"]["full_forwards"]) == (15, 11)
  assert rows["flow_time:1"]["full_forwards"] == 15 and rows["flow_time:1"]["latent_rel_err"] < 1e-5
  assert rows["upstream"]["latent_rel_err"] > 0
  capsys.readouterr()
  assert bench.main(["--variants", "upstream:x"]) == 2
  assert capsys.readouterr().err.strip().count("\n") == 0
