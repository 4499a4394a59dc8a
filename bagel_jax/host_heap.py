"""A steady host heap for CPU runs.

XLA's CPU runtime takes every execution's temporaries (about 100 MB per step of the shapes demo)
from glibc's malloc. Called from XLA's worker threads, a request that large is served by a fresh
`mmap` and returned with `munmap` when the step ends, so the kernel zero-fills those pages again on
every step: 25,000 page faults per demo step and about 28% of the run's CPU time spent in the
kernel. One arena that never maps or trims (glibc's `MALLOC_ARENA_MAX=1`, `MALLOC_MMAP_MAX_=0`,
`MALLOC_TRIM_THRESHOLD_`) reuses the same pages step after step.

glibc reads these settings once, when the process starts, so a command that wants them re-executes
itself with them set (same PID, same arguments). It is opt-in (`BAGEL_HOST_HEAP=steady`): on the
2-core VM it removed the page faults and the kernel time (28% -> 3% of the step's CPU time) but not
wall time (the shapes demo's loop ran 6.6 vs 5.7 steps/s with scanned layers and 7.3 vs 7.4 with
unrolled ones, without vs with; docs/benchmarks.md). Hosts with an accelerator are always left
alone: there the steps' memory is the device's, and a heap that never shrinks would keep whatever a
checkpoint restore staged on the host. Any `MALLOC_*` variable of your own wins.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

STEADY_HEAP = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def has_accelerator() -> bool:
  """True when a GPU or TPU device node is present (checked without starting JAX)."""
  return any(glob.glob(pattern) for pattern in ACCELERATOR_NODES)


def wants_steady_heap(environ: dict[str, str]) -> bool:
  """Whether to re-execute with STEADY_HEAP: asked for, glibc Linux, CPU only, no user malloc settings."""
  if environ.get("BAGEL_HOST_HEAP", "system") != "steady":
    return False
  if any(k.startswith("MALLOC_") for k in environ):
    return False  # the user's own settings, or this process was already re-executed
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  return not has_accelerator()


def reexec_with_steady_heap() -> None:
  """Re-executes this command line (interpreter flags included) with STEADY_HEAP when
  `wants_steady_heap`; else returns. Call it first thing in a command's entry point."""
  if not wants_steady_heap(dict(os.environ)):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **STEADY_HEAP})
