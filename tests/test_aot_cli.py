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
  for args, words in ((("--target", "v9:2x2", "--preset", "bagel_tiny"), "unknown target 'v9:2x2'"),
                      (("--target", "v5e:2x2", "--preset", "bagel_tiny", "--programs", "train,sample"),
                       "--programs"),
                      (("--target", "v5e:2x2", "--preset", "bagel_tiny", "--mesh", "fsdp=3"), "--mesh"),
                      (("--target", "v5e:2x2", "--preset", "nope"), "--preset")):
    r = _run(*args, timeout=120)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("aot: ") and words in last and "Traceback" not in r.stderr, r.stderr
