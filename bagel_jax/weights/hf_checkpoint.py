"""A Hugging Face model folder: `config.json` and its safetensors weights, checked and read tensor by tensor.

The weights are one `model.safetensors`, or shards listed by `model.safetensors.index.json`
("weight_map": key -> shard file), as `save_pretrained` writes them.  Every shard's header is
read and checked against the index when the folder is opened; tensors are then read one at a
time with `pread` (`SafetensorsFile`), so host memory holds one tensor, not a shard.
"""

from __future__ import annotations

import pathlib

import numpy as np

from bagel_jax import jsonfile
from bagel_jax.weights.errors import CheckpointError
from bagel_jax.weights.safetensors_io import SafetensorsFile, TensorEntry

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FLOAT_DTYPES = ("BF16", "F16", "F32")


def read_json(path: pathlib.Path, what: str = "file") -> dict:
  return jsonfile.read_json(path, CheckpointError, what=what, object_required="expected a JSON object")


def _index_files(index: pathlib.Path) -> dict[str, pathlib.Path]:
  weight_map = read_json(index).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise CheckpointError(f"{index}: no weight_map")
  files = {k: index.parent / f for k, f in weight_map.items()}
  for k, f in files.items():
    if not f.is_file():
      raise CheckpointError(f"{index}: lists {f.name} (key {k}), which does not exist")
  return files


class HFCheckpoint:
  """`folder/config.json` and the safetensors tensors of a `save_pretrained` folder."""

  def __init__(self, folder, role: str):
    self.folder, self.role = pathlib.Path(folder), role
    if not self.folder.is_dir():
      raise CheckpointError(f"{self.folder}: {role} folder not found")
    self.config = read_json(self.folder / "config.json", f"{role} config")
    index, single = self.folder / INDEX_NAME, self.folder / SINGLE_NAME
    if index.is_file():
      listed = _index_files(index)
      shards = {f: SafetensorsFile(f) for f in sorted(set(listed.values()))}
      for k, f in listed.items():
        if k not in shards[f].entries:
          raise CheckpointError(f"{f}: key {k} is listed in {INDEX_NAME} but not in this shard")
      for f, sf in shards.items():
        for k in sf.entries:
          if listed.get(k) != f:
            raise CheckpointError(f"{f}: key {k} is not listed for this shard in {INDEX_NAME}")
    elif single.is_file():
      shards = {single: SafetensorsFile(single)}
    else:
      raise CheckpointError(f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME} ({role} weights must be safetensors)")
    self.where: dict[str, SafetensorsFile] = {k: sf for sf in shards.values() for k in sf.entries}

  def keys(self) -> set[str]:
    return set(self.where)

  def entry(self, key: str) -> TensorEntry:
    return self.where[key].entries[key]

  def path(self, key: str) -> pathlib.Path:
    return self.where[key].path

  def read(self, key: str) -> np.ndarray:
    return self.where[key].read(key)

  def check(self, key: str, shape: tuple[int, ...]) -> None:
    """One line if `key` is absent, not a float tensor, or not of `shape`."""
    if key not in self.where:
      raise CheckpointError(f"{self.folder}: {self.role} checkpoint has no key {key}")
    ent = self.entry(key)
    if ent.dtype not in FLOAT_DTYPES:
      raise CheckpointError(f"{self.path(key)}: key {key} has dtype {ent.dtype}, expected one of {FLOAT_DTYPES}")
    if tuple(ent.shape) != tuple(shape):
      raise CheckpointError(f"{self.path(key)}: key {key} has shape {list(ent.shape)}, expected {list(shape)} "
                            f"(from {self.folder / 'config.json'})")


__all__ = ["HFCheckpoint", "read_json", "INDEX_NAME", "SINGLE_NAME"]
