"""`python -m bagel_jax.bench NAME [args...]`: runs `bagel_jax.bench.NAME.main(args)`.

Any module in this package with a `main(argv)` function is a subcommand (attention, convert,
generate, ...); `python -m bagel_jax.bench` with no name lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bagel_jax.bench as _pkg


def commands() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(_pkg.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # the command line: CPU benchmarks run with the trainer's host heap
    from bagel_jax import host_heap
    host_heap.reexec_with_steady_heap()
  argv = sys.argv[1:] if argv is None else argv
  names = commands()
  if not argv or argv[0] in ("-h", "--help"):
    print(f"usage: python -m bagel_jax.bench {{{','.join(names)}}} [args...]")
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in names:
    print(f"unknown benchmark {name!r}; available: {', '.join(names)}", file=sys.stderr)
    return 2
  module = importlib.import_module(f"bagel_jax.bench.{name}")
  if not hasattr(module, "main"):
    print(f"bagel_jax.bench.{name} has no main(argv)", file=sys.stderr)
    return 2
  rc = module.main(rest)
  return int(rc or 0)


if __name__ == "__main__":
  sys.exit(main())
