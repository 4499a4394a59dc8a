"""`python -m bagel_jax.aot`: the tiny model's denoising and decode steps compiled for a TPU target."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "bagel_jax.aot", *args], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=timeout)


def test_cli_compiles_denoise_and_decode_for_tpu(tmp_path):
  out = tmp_path / "aot.json"
  r = _run("--target", "v6e:2x2", "--preset", "bagel_tiny", "--mesh", "fsdp=2,tensor=2", "--programs",
           "denoise,decode", "--image", "64", "--context", "64", "--decode_rows", "4", "--json", str(out))
  assert r.returncode == 0, r.stdout + r.stderr
  assert "[v6e:2x2] denoise" in r.stdout and "[v6e:2x2] decode" in r.stdout and "fits" in r.stdout
  res = {x["program"]: x for x in json.loads(out.read_text())}
  assert set(res) == {"denoise", "decode"}
  for x in res.values():
    assert x["device_kind"] == "TPU v6 lite" and x["mesh"] == "data=1 x fsdp=2 x tensor=2"
    assert x["kernels"] >= 1, x  # the Mosaic attention kernel, not an XLA fallback
    assert 0 < x["total"] < x["memory_limit"] and x["fits"]


def test_cli_bad_input_is_one_line_exit_2():
  for args, words in ((("--target", "v9:2x2", "--preset", "bagel_tiny", "--programs", "decode"),
                       "unknown target 'v9:2x2'"),
                      (("--target", "v5e:2x2", "--preset", "bagel_tiny", "--programs", "train,sample"),
                       "--programs"),
                      (("--target", "v5e:2x2", "--preset", "bagel_tiny", "--programs", "decode", "--mesh", "fsdp=3"), "--mesh"),
                      (("--target", "v5e:2x2", "--preset", "nope"), "--preset"),
                      (("--target", "v5e:2x2", "--preset", "bagel_tiny", "--programs", "denoise", "--image", "256"),
                       "--image 256 gives a 32x32 latent grid; this model's max_latent_size is 8"),
                      (("--target", "v5e:2x2", "--preset", "bagel_tiny", "--programs", "denoise", "--image", "60"),
                       "--image 60 is not a positive multiple of the latent stride 8"),
                      (("--target", "v5e:2x2", "--preset", "bagel_tiny", "--programs", "train"),
                       "training row (--gen_side 512, --und_side 448, --tokens 32768): VAE image latent grid")):
    r = _run(*args, timeout=120)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("aot: ") and words in last and "Traceback" not in r.stderr, r.stderr


def test_a_program_the_compiler_refuses_is_one_line_and_does_not_fit(monkeypatch, tmp_path, capsys):
  """A compile-time out-of-memory refusal (as libtpu gives for the 7B step on v5e) is reported as the
  program not fitting, in the compiler's words; the other programs still compile; exit status 1."""
  from bagel_jax.aot import runner
  from bagel_jax.aot.__main__ import main

  oom = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required for "
         "HLO temporaries (23.72G) exceeds available HBM (15.75G). HLO module: jit_fn.\nSee https://openxla.org")
  compile_one = runner._compile_one

  def refuse_train(job, program, layers, mesh, rules):
    if program == "train":
      raise RuntimeError(oom)
    return compile_one(job, program, layers, mesh, rules)

  monkeypatch.setattr(runner, "_compile_one", refuse_train)
  out = tmp_path / "aot.json"
  code = main(["--target", "v5e:2x2", "--preset", "bagel_tiny", "--programs", "train,decode", "--context", "64",
               "--decode_rows", "4", "--gen_side", "64", "--und_side", "56", "--gen_images", "1", "--und_images", "1", "--ce_tokens", "64",
               "--tokens", "1024", "--json", str(out)])
  stdout = capsys.readouterr().out
  assert code == 1, stdout
  refused = [ln for ln in stdout.splitlines() if ln.startswith("[v5e:2x2] train")]
  assert refused == ["[v5e:2x2] train (mesh data=1 x fsdp=4 x tensor=1; attention=auto): DOES NOT FIT: the compiler "
                     "refuses it at 2 layers: Ran out of memory on HBM, the total memory required for HLO temporaries "
                     "(23.72G) exceeds available HBM (15.75G)."], stdout
  res = {x["program"]: x for x in json.loads(out.read_text())}
  assert res["train"]["fits"] is False and res["train"]["refused"].endswith("exceeds available HBM (15.75G).")
  assert res["decode"]["fits"] and res["decode"]["kernels"] >= 1
