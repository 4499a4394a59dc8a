"""Runs a command-line entry point on many argument lists, each in its own process, as
`python -m MODULE ARGS...` would, paying the interpreter's and the libraries' start-up once.

    python tests/cli_runner.py MODULE CASES.json OUT.json [--guard] [--preload=MODULE,...]

CASES.json: {"name": [arg, ...], ...}. This process imports the --preload modules (importing runs
nothing on a device), then forks one child per case; the child runs MODULE as `__main__` (runpy, like
`python -m`) with its own stdout/stderr files, and its exit status is the process's. OUT.json:
{"name": {"code": int, "stdout": str, "stderr": str, "device_work": [str, ...]}}.

--guard: in each child, any lowering or compilation of a computation (every computation, jitted
or op by op, is lowered and compiled in a fresh process before it can run) and any host-to-device
transfer raises, and is listed in "device_work", so "refused before anything ran on a device" is
checked rather than assumed.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import runpy
import sys
import tempfile
import traceback

GUARDED_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")


def _guard(log: pathlib.Path) -> None:
  import jax

  def on_event(name: str, secs: float, **kw) -> None:
    del secs, kw
    if name in GUARDED_EVENTS:
      with open(log, "a") as f:
        f.write(name + "\n")
      raise AssertionError(f"device work before the input was refused: {name}")

  jax.monitoring.register_event_duration_secs_listener(on_event)
  jax.config.update("jax_transfer_guard", "disallow_explicit")


def _child(module: str, args: list[str], out: pathlib.Path, err: pathlib.Path, log: pathlib.Path | None) -> None:
  """Runs in the forked child; never returns."""
  code = 1
  try:
    for fd, path in ((1, out), (2, err)):
      f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
      os.dup2(f, fd)
      os.close(f)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    if log is not None:
      _guard(log)
    sys.argv = [module, *args]
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      if not isinstance(e.code, (int, type(None))):
        print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 -- as the interpreter would: a traceback and status 1
      traceback.print_exc()
      code = 1
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)


def run_cases(module: str, cases: dict[str, list[str]], guard: bool) -> dict[str, dict]:
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for i, (name, args) in enumerate(cases.items()):
      out, err, log = (pathlib.Path(tmp) / f"{i}.{k}" for k in ("out", "err", "log"))
      pid = os.fork()
      if pid == 0:
        _child(module, args, out, err, log if guard else None)
      _, status = os.waitpid(pid, 0)
      read = lambda p: p.read_text() if p.exists() else ""
      results[name] = {"code": os.waitstatus_to_exitcode(status), "stdout": read(out), "stderr": read(err),
                       "device_work": read(log).split()}
  return results


def main(argv: list[str]) -> int:
  module, cases_file, out_file, *flags = argv
  # Start-up paid once: the modules every child needs (importing them runs nothing on a device).
  for flag in flags:
    if flag.startswith("--preload="):
      for name in flag.split("=", 1)[1].split(","):
        importlib.import_module(name)
  cases = json.loads(pathlib.Path(cases_file).read_text())
  results = run_cases(module, cases, guard="--guard" in flags)
  pathlib.Path(out_file).write_text(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
