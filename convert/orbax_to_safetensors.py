"""Exports a converted Orbax checkpoint folder back to the release's safetensors layout.

    python -m convert.orbax_to_safetensors --src OUT_DIR --dst DIR

Writes DIR/ema.safetensors and DIR/ae.safetensors with upstream's exact tensor names,
shapes and dtypes (ema bf16, ae f32; `bagel_jax.weights.release_rules` is the map), plus the
configs and tokenizer files, so DIR is a release folder again.  Reads one (layer, expert)
slice at a time from the Orbax arrays, so host memory stays at about two upstream tensors.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import time
from typing import Callable

from convert.safetensors_to_orbax import Progress, Summary, main_wrapper


def export(src, dst, *, overwrite: bool = False, progress: bool = True,
           on_tensor: Callable[[str, int], None] | None = None) -> Summary:
  """Streams an Orbax checkpoint folder (from `convert.safetensors_to_orbax`) to safetensors."""
  from bagel_jax.weights import table as W
  from bagel_jax.weights.orbax_stream import STATE_DIR, OrbaxState, release_freed_buffers
  from bagel_jax.weights.safetensors_io import ST_DTYPES, SafetensorsWriter
  from bagel_jax.weights.folders import AtomicDir, check_destination, side_files
  from bagel_jax.config import load_config

  t0 = time.perf_counter()
  src, dst = pathlib.Path(src).absolute(), pathlib.Path(dst).absolute()
  check_destination(dst, overwrite)
  if dst == src or dst in src.parents:
    raise W.CheckpointError(f"{dst}: the destination must not be the source folder or contain it")
  if not src.is_dir():
    raise W.CheckpointError(f"{src}: checkpoint folder not found")
  release_freed_buffers()
  cfg = load_config(src)
  state = OrbaxState(src / STATE_DIR)
  table = W.release_rules(cfg)  # with tie_word_embeddings, lm_head.weight written from embed_tokens

  # Check the whole table against the stored arrays before writing anything.
  plan: dict[str, list] = {f: [] for f in W.FILE_NAMES}
  for r in table:
    meta = state.get(r.path)
    stored = tuple(meta.shape)
    if len(stored) < len(r.index) or any(i >= d for i, d in zip(r.index, stored)):
      raise W.CheckpointError(f"{state.dir}: array {'/'.join(map(str, r.path))} of shape {list(stored)} has no "
                              f"slice {r.index} for key {r.upstream}")
    plan[r.file].append((r.upstream, r, W.upstream_shape(r.kind, stored[len(r.index):])))
  total = sum(int(_prod(s)) * ST_DTYPES[W.FILE_DTYPES[f]].itemsize for f in plan for _, _, s in plan[f])

  t_setup = time.perf_counter() - t0
  bar = Progress(total, "orbax -> safetensors", progress)
  n = 0
  try:
    with AtomicDir(dst, overwrite=overwrite) as out:
      for file_id, entries in plan.items():
        entries.sort(key=lambda e: e[0])
        st_dtype = W.FILE_DTYPES[file_id]
        writer = SafetensorsWriter(out.path / W.FILE_NAMES[file_id], [(k, s, st_dtype) for k, _, s in entries])
        # One read in flight ahead of the one being written.
        pending = state.read_async(entries[0][1].path, entries[0][1].index) if entries else None
        for i, (key, r, _) in enumerate(entries):
          x = pending.result()
          pending = (state.read_async(entries[i + 1][1].path, entries[i + 1][1].index)
                     if i + 1 < len(entries) else None)
          if x.dtype != ST_DTYPES[st_dtype]:
            x = x.astype(ST_DTYPES[st_dtype])
          if r.kind == W.LINEAR and x.ndim == 2:
            writer.write_transposed(key, x)  # == W.to_upstream(LINEAR, x), blocked
          else:
            writer.write(key, W.to_upstream(r.kind, x))
          bar.update(x.nbytes)
          n += 1
          if on_tensor is not None:
            on_tensor(key, x.nbytes)
          del x
        writer.close()
      for f in side_files(src):
        shutil.copy2(f, out.path / f.name)
      out.commit()
  finally:
    bar.close()
  return Summary(n, total, time.perf_counter() - t0, str(src), str(dst), t_setup)


def _prod(shape) -> int:
  out = 1
  for d in shape:
    out *= int(d)
  return out


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="bagel-orbax-to-safetensors", description=__doc__.split("\n\n")[0])
  ap.add_argument("--src", required=True, type=pathlib.Path, help="converted folder (state/ + configs)")
  ap.add_argument("--dst", required=True, type=pathlib.Path, help="output folder (must not exist)")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing destination (atomically)")
  ap.add_argument("--quiet", action="store_true", help="no progress bar")
  return ap


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  s = export(args.src, args.dst, overwrite=args.overwrite, progress=not args.quiet)
  print(s.line("exported"))


def run(argv=None) -> None:
  """Console entry point `bagel-orbax-to-safetensors`."""
  sys.exit(main_wrapper(main, argv))


if __name__ == "__main__":
  run()
