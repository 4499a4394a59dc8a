"""Converts a BAGEL release folder (safetensors) into a self-contained Orbax checkpoint folder.

    python -m convert.safetensors_to_orbax --src RELEASE_DIR --dst OUT_DIR [--dtype bfloat16|float32]

RELEASE_DIR holds ema.safetensors (or shards listed by a *.safetensors.index.json),
ae.safetensors, llm_config.json, vit_config.json (optionally bagel_config.json) and the
tokenizer files.  OUT_DIR gets `state/` (an Orbax PyTree checkpoint of {"bagel", "vae"}
in bagel_jax's layout), the configs and tokenizer files, and `conversion.json`; restore it
with `bagel_jax.load_checkpoint(OUT_DIR, mesh=...)`.

Every key, shape and dtype is checked against `bagel_jax.weights.rules` before anything is
written.  Tensors are then read one at a time (pread, no memory map), transformed
(transpose, stacked into their (layer, expert) slot) and written slice by slice, so host
memory stays at about two upstream tensors whatever the model size.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import shutil
import sys
import time
from typing import Callable



# ----------------------------------------------------------------------------- shared CLI pieces
@dataclasses.dataclass
class Summary:
  """What one conversion did."""
  tensors: int
  bytes: int
  seconds: float
  src: str
  dst: str
  setup_seconds: float = 0.0  # imports, configs, validation: before the first byte is written

  @property
  def gb_per_s(self) -> float:
    return self.bytes / 1e9 / max(self.seconds, 1e-9)

  def line(self, verb: str) -> str:
    return (f"{verb} {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {self.seconds:.1f} s "
            f"({self.gb_per_s:.2f} GB/s): {self.src} -> {self.dst}")


class Progress:
  """A tqdm bar in bytes (thread-safe updates); silent when disabled."""

  def __init__(self, total: int, desc: str, enabled: bool):
    self.bar = None
    if enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                      dynamic_ncols=True, mininterval=0.5)

  def update(self, n: int) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def main_wrapper(fn, argv) -> int:
  """Runs `fn(argv)`, turning expected failures into one line on stderr and an exit status."""
  from bagel_jax.config import ConfigError
  from bagel_jax.weights import CheckpointError

  from bagel_jax import faults

  faults.quiet_background_tracebacks()
  try:
    fn(argv)
    return 0
  except (CheckpointError, ConfigError, FileNotFoundError, FileExistsError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"error: {msg}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    why = str(e) or "interrupted"
    print(f"error: {why}; nothing was written to the destination", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 - a full disk, a read-only folder: one line; a bug keeps its traceback
    line = faults.describe(e)
    if line is None or faults.show_traceback():
      raise
    print(f"error: {line}; nothing was written to the destination", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- conversion
def _plan(src: pathlib.Path, cfg, dtype, allow_extra: bool):
  """Validates the release folder and builds the tree of StreamedArrays to write."""
  from bagel_jax.weights import table as W
  from bagel_jax.api import BagelModel
  from bagel_jax.weights.safetensors_io import SafetensorsFile
  from bagel_jax.weights.stream_tree import TensorRef, streamed_tree

  abstract = BagelModel(cfg).abstract_params()
  files = W.UpstreamFiles(src)
  table = W.rules(cfg)
  W.validate(files, table, abstract, allow_extra=allow_extra, optional=W.tied_rules(cfg))
  readers: dict[pathlib.Path, SafetensorsFile] = {}

  def ref(r: W.Rule) -> TensorRef:
    path = files.key_file[(r.file, r.upstream)]
    if path not in readers:
      readers[path] = SafetensorsFile(path)
    reader, ent = readers[path], readers[path].entries[r.upstream]
    return TensorRef(tuple(ent.shape), ent.dtype, lambda: reader.read(ent.key))

  tree, n_bytes = streamed_tree(abstract, table, ref, dtype, str(src))
  return tree, len(table), n_bytes


def convert(src, dst, *, dtype: str | None = None, allow_extra: bool = False, overwrite: bool = False,
            progress: bool = True, chunk_bytes: int = 32 << 20, on_piece: Callable[[str, int], None] | None = None
            ) -> Summary:
  """Streams a release folder into an Orbax checkpoint folder; returns what it did.

  `dtype` (None, 'bfloat16' or 'float32') is the stored dtype of every array (default:
  as in the release, bf16 for ema and f32 for ae).  `on_piece(key, nbytes)` is called
  after each tensor is written (from the writer thread).
  """
  from bagel_jax.weights.orbax_stream import CONVERSION_FILE, FORMAT, STATE_DIR, save_streamed
  from bagel_jax.weights.folders import AtomicDir, check_destination
  from bagel_jax.weights.orbax_stream import release_freed_buffers
  from bagel_jax.weights.folders import side_files
  from bagel_jax.config import load_config
  from bagel_jax.weights import CheckpointError

  t0 = time.perf_counter()
  src, dst = pathlib.Path(src).absolute(), pathlib.Path(dst).absolute()
  if dtype not in (None, "bfloat16", "float32"):
    raise CheckpointError(f"--dtype {dtype}: expected bfloat16 or float32")
  check_destination(dst, overwrite)
  if dst == src or dst in src.parents:
    raise CheckpointError(f"{dst}: the destination must not be the source folder or contain it")
  if not src.is_dir():
    raise CheckpointError(f"{src}: checkpoint folder not found")
  release_freed_buffers()
  cfg = load_config(src)
  tree, n_tensors, n_bytes = _plan(src, cfg, dtype, allow_extra)

  t_setup = time.perf_counter() - t0
  bar = Progress(n_bytes, "safetensors -> orbax", progress)

  def piece_done(name: str, n: int) -> None:
    bar.update(n)
    if on_piece is not None:
      on_piece(name, n)

  try:
    with AtomicDir(dst, overwrite=overwrite) as out:
      save_streamed(out.path / STATE_DIR, tree, chunk_bytes=chunk_bytes, on_piece=piece_done,
                    register_cancel=out.on_abort)
      copied = []
      for f in side_files(src):
        shutil.copy2(f, out.path / f.name)
        copied.append(f.name)
      info = {
          "format": FORMAT,
          "source": str(src),
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "dtype": dtype or "as stored (ema bfloat16, ae float32)",
          "tensors": n_tensors,
          "source_bytes": n_bytes,
          "files_copied": copied,
          "config": dataclasses.asdict(cfg),
          "orbax_checkpoint": _version("orbax-checkpoint"),
      }
      (out.path / CONVERSION_FILE).write_text(json.dumps(info, indent=1) + "\n")
      out.commit()
  finally:
    bar.close()
  return Summary(n_tensors, n_bytes, time.perf_counter() - t0, str(src), str(dst), t_setup)


def _version(dist: str) -> str:
  from importlib import metadata
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return "unknown"


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="bagel-safetensors-to-orbax", description=__doc__.split("\n\n")[0])
  ap.add_argument("--src", required=True, type=pathlib.Path, help="release folder (ema/ae safetensors + configs)")
  ap.add_argument("--dst", required=True, type=pathlib.Path, help="output folder (must not exist)")
  ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                  help="stored dtype of every array (default: as released: ema bf16, ae f32)")
  ap.add_argument("--allow-extra", action="store_true", help="ignore tensors the weights table does not know")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing destination (atomically)")
  ap.add_argument("--quiet", action="store_true", help="no progress bar")
  return ap


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  s = convert(args.src, args.dst, dtype=args.dtype, allow_extra=args.allow_extra, overwrite=args.overwrite,
              progress=not args.quiet)
  print(s.line("converted"))


def run(argv=None) -> None:
  """Console entry point `bagel-safetensors-to-orbax`."""
  sys.exit(main_wrapper(main, argv))


if __name__ == "__main__":
  run()
