"""Bad hyper-parameters and unknown keys are refused before anything compiles, in one line naming
the field, the value and the allowed range (`bagel_jax.train.validate`)."""

from __future__ import annotations

import functools
import math
import pathlib
import subprocess
import sys

import jax
import pytest

from bagel_jax import train
from bagel_jax.train.config import TrainConfigError
from bagel_jax.train import validate

REPO = pathlib.Path(__file__).resolve().parent.parent


def _compiled_too_early(name, *args, **kwargs):
  raise AssertionError(f"{name} was compiled before the bad input was refused")


def _refusing_jit(fun=None, *args, **kwargs):
  """jax.jit whose functions fail when called (= compiled): used as a decorator or directly."""
  return _refusing_jit if fun is None else functools.partial(_compiled_too_early, getattr(fun, "__name__", fun))


@pytest.fixture
def no_compile(monkeypatch):
  monkeypatch.setattr(jax, "jit", _refusing_jit)


def tiny():
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_config", REPO / "configs" / "tiny.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _set(c, path: str, value) -> None:
  *parents, last = path.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[last] = value


BAD = [
    ("optim.lr", math.nan, "optim.lr=nan: must be a finite number >= 0"),
    ("optim.lr", -1.0, "optim.lr=-1: must be a finite number >= 0"),
    ("optim.lr", math.inf, "optim.lr=inf: must be a finite number >= 0"),
    ("optim.b1", 1.0, "optim.b1=1: must be in [0, 1)"),
    ("optim.b2", -0.5, "optim.b2=-0.5: must be in [0, 1)"),
    ("optim.eps", 0.0, "optim.eps=0: must be a finite number > 0"),
    ("optim.weight_decay", -0.01, "optim.weight_decay=-0.01: must be a finite number >= 0"),
    ("optim.clip", 0.0, "optim.clip=0: must be a finite number > 0"),
    ("train.ema_decay", 1.5, "train.ema_decay=1.5: must be in [0, 1]"),
    ("train.steps", 0, "train.steps=0: must be an integer >= 1"),
    ("train.keep", -1, "train.keep=-1: must be an integer >= 1"),
    ("data.rows", 0, "data.rows=0: must be an integer >= 1"),
    ("data.capacity.vae", 8, "data.capacity.vae=8 cannot hold one sample of data group 't2i' (its smallest "
                             "sample needs 16)"),
    ("data.capacity.vit", 2, "data.capacity.vit=2 cannot hold one sample of data group 'qa' (its smallest sample "
                             "needs 4)"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_bad_value_refused_before_compiling(tmp_path, no_compile, path, value, message):
  c = tiny()
  _set(c, path, value)
  with pytest.raises(TrainConfigError) as e:
    train.run(c, tmp_path / "w")
  assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
  assert not (tmp_path / "w").exists()


def test_huge_max_tokens_says_the_estimate_and_the_limit(tmp_path, no_compile):
  c = tiny()
  c.data.capacity = dict(tokens=100_000_000, und=0, gen=0, vit=0, vae=0, ce=0, vae_images=0)
  c.data.expected_tokens = 0
  with pytest.raises(TrainConfigError) as e:
    train.run(c, tmp_path / "w")
  msg = str(e.value)
  assert msg.startswith("data.capacity.tokens=100000000 x data.rows=2: the batch buffers need about ") and \
      "GiB, more than the limit of" in msg, msg


def test_unknown_key_in_a_config_file(tmp_path):
  """A typo in a config file (not an override) used to be ignored silently."""
  cfg = tmp_path / "typo.py"
  cfg.write_text(f"import importlib.util\n"
                 f"spec = importlib.util.spec_from_file_location('t', {str(REPO / 'configs' / 'tiny.py')!r})\n"
                 "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
                 "def get_config():\n"
                 "  c = m.get_config()\n"
                 "  c.train.lerning_rate = 0.1\n"
                 "  c.optim.weight_decai = 0.1\n"
                 "  return c\n")
  r = subprocess.run([sys.executable, "-m", "bagel_jax.train", "--config", str(cfg), "--workdir", str(tmp_path / "w")],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      "bagel_jax.train: error: unknown config key 'optim.weight_decai'; did you mean optim.weight_decay?")
  assert not (tmp_path / "w").exists()


def test_every_shipped_config_has_only_known_keys():
  import importlib.util
  checked = 0
  for f in sorted((REPO / "configs").glob("*.py")):
    if f.name == "__init__.py":
      continue
    spec = importlib.util.spec_from_file_location(f.stem, f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
      continue  # shared pieces of the config files
    validate.check_keys(mod.get_config())
    validate.check_ranges(mod.get_config())
    checked += 1
  assert checked >= 4


def test_unknown_key_names_the_closest():
  c = tiny()
  c.data.capacity.toknes = 3
  with pytest.raises(TrainConfigError, match=r"^unknown config key 'data.capacity.toknes'; did you mean "
                                             r"data.capacity.tokens\?$"):
    validate.check_keys(c)


def test_config_file_without_get_config_or_broken_and_a_workdir_that_is_a_file(tmp_path, no_compile):
  from bagel_jax.train.config import check_overrides
  (tmp_path / "noget.py").write_text("x = 1\n")
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  for name, start in (("noget.py", "has no get_config() function"), ("broken.py", ": SyntaxError: ")):
    with pytest.raises(TrainConfigError) as e:
      check_overrides(["train", "--config", str(tmp_path / name), "--workdir", "w"])
    msg = str(e.value)
    assert msg.startswith(f"config file {tmp_path / name}") and start in msg and "\n" not in msg, msg
  (tmp_path / "afile").write_text("mine")
  for workdir in (tmp_path / "afile", tmp_path / "afile" / "w"):
    with pytest.raises(TrainConfigError) as e:
      train.run(tiny(), workdir)
    assert str(e.value) == f"--workdir {workdir}: {tmp_path / 'afile'} is a file, not a folder", str(e.value)
  assert (tmp_path / "afile").read_text() == "mine"
