"""The benchmark interface shared by every runner: items, requests, and what a benchmark provides.

A benchmark reads its data into `Item`s (stable keys, in the data's order), says which items are
finished on disk, turns an unfinished item into Inferencer requests, writes the outputs of one item
atomically, and at the end assembles the official output files and computes its offline scores.
`bagel_jax.eval.runner` does the rest (sharding, devices, batching, resume, progress, summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import Any, ClassVar, Sequence

from bagel_jax.config import BagelConfig


class EvalError(ValueError):
  """A user's mistake (a missing or malformed data file, a bad option): one line, exit code 2."""


@dataclasses.dataclass
class Item:
  """One benchmark entry. key: unique and stable (names its output); data: its JSON-able fields;
  blobs: non-JSON payloads (image bytes) kept out of records."""

  key: str
  data: dict[str, Any]
  blobs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Request:
  """One Inferencer request: its inputs (texts, `ImageInput`s) and, for image outputs, the seed of
  its initial noise and the output's pixel size (so the noise does not depend on the batch)."""

  inputs: list
  seed: tuple[int, ...] = ()
  shape: tuple[int, int] | None = None
  tag: Any = None


class Benchmark:
  """Base class; subclasses set `name`, `task` and implement the methods below."""

  name: ClassVar[str] = ""
  task: ClassVar[str] = "understanding"  # or "generation" / "editing"
  description: ClassVar[str] = ""

  def __init__(self, args: argparse.Namespace, cfg: BagelConfig):
    self.args = args
    self.cfg = cfg
    self.out = pathlib.Path(args.out)

  @classmethod
  def add_arguments(cls, p: argparse.ArgumentParser) -> None:
    """Benchmark-specific options (the shared ones are added by the CLI)."""

  def settings(self) -> dict[str, Any]:
    """The run's settings (recorded in the summary)."""
    return dict(self.infer_kwargs())

  def infer_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of `Inferencer.batch` for every request of this run."""
    raise NotImplementedError

  def load(self) -> list[Item]:
    raise NotImplementedError

  def is_done(self, item: Item) -> bool:
    raise NotImplementedError

  def requests(self, item: Item) -> list[Request]:
    raise NotImplementedError

  def save(self, item: Item, requests: Sequence[Request], outputs: Sequence[list]) -> None:
    raise NotImplementedError

  def finalize(self, items: Sequence[Item]) -> dict[str, Any]:
    """Writes the official output files from the finished items; returns the offline scores ({} if none)."""
    return {}


def require_file(path: str | pathlib.Path, what: str) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.is_file():
    raise EvalError(f"{path}: {what} not found")
  return path


def require_dir(path: str | pathlib.Path, what: str) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.is_dir():
    raise EvalError(f"{path}: {what} folder not found")
  return path


def field(row: dict, name: str, where: str) -> Any:
  """row[name], or a one-line error naming the file and the entry."""
  if not isinstance(row, dict) or name not in row:
    raise EvalError(f"{where}: missing field {name!r}")
  return row[name]


__all__ = ["EvalError", "Item", "Request", "Benchmark", "require_file", "require_dir", "field"]
