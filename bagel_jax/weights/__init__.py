"""Weights: the upstream key table and every way parameters enter or leave the project.

    table.py           the one table between upstream tensor names/layouts and our parameter tree;
                       the release-folder loader (`load_upstream`)
    safetensors_io.py  checked, streamed safetensors reads and writes
    orbax_stream.py    Orbax saves written slice by slice, and slice reads of saved states
    folders.py         atomic output folders
    load.py            `load_checkpoint`: a converted folder restored into its shardings
    stream_tree.py     the table's tensors as a tree of streamed Orbax leaves (the converters' saves)
    place.py           parameters placed slice by slice into their shardings from upstream-layout tensors
    hf_checkpoint.py   a Hugging Face model folder (config.json, safetensors shards + index), checked
    hf_init.py         BAGEL for pre-training from Qwen2.5 + SigLIP + FLUX, as upstream's main() builds it
    hf_export.py       an hf_init model written as a release-layout or Orbax folder (streamed, atomic)
    hf_random.py       random models in Hugging Face format (tests, the shapes demo)
    hub.py             Hugging Face repo ids resolved to local folders (cache first, only the needed files)

The converters (`convert/`), the trainer and the inferencer all go through these modules.
"""

from bagel_jax.weights.errors import CheckpointError
from bagel_jax.weights.table import (CONV, IDENTITY, LINEAR, FILE_DTYPES, FILE_NAMES, Rule, UpstreamFiles,
                                     expected_upstream_shape, load_upstream, release_rules, rules, tied_rules,
                                     to_ours, to_upstream, upstream_shape, validate)


def __getattr__(name):  # lazy: load_checkpoint needs the model, which needs this package's table
  if name == "load_checkpoint":
    from bagel_jax.weights.load import load_checkpoint
    return load_checkpoint
  raise AttributeError(f"module 'bagel_jax.weights' has no attribute {name!r}")


__all__ = ["CheckpointError", "CONV", "IDENTITY", "LINEAR", "FILE_DTYPES", "FILE_NAMES", "Rule", "UpstreamFiles",
           "expected_upstream_shape", "load_upstream", "release_rules", "rules", "tied_rules", "to_ours", "to_upstream", "upstream_shape", "validate",
           "load_checkpoint"]
