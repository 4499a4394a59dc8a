"""Writes an `HFInit` as a folder every loader of the project accepts, streamed and atomic.

- "safetensors": the release layout: `ema.safetensors` (upstream's names, float32 unless asked
  otherwise), `ae.safetensors`, `llm_config.json`, `vit_config.json` (layers used + 1, the
  release convention), `bagel_config.json` (BAGEL's settings, the special token ids, the VAE
  architecture), the tokenizer files (with a `tokenizer.json`) and `conversion.json`;
- "orbax": the project's converted layout (`state/` + the same side files), written slice by
  slice with `orbax_stream.save_streamed`.

Tensors are made and written one at a time (host memory: about one tensor, two for the
resized embedding tables), into a temporary folder renamed onto the destination at the end.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import shutil
import time
from typing import Any, Callable

from bagel_jax.weights.errors import CheckpointError
from bagel_jax.weights.folders import AtomicDir, check_destination, side_files
from bagel_jax.weights.hf_init import HFInit
from bagel_jax.weights.orbax_stream import CONVERSION_FILE, FORMAT, STATE_DIR, release_freed_buffers
from bagel_jax.weights.safetensors_io import SafetensorsWriter, np_dtype

FORMATS = ("safetensors", "orbax")
DTYPES = ("float32", "bfloat16")
_ST_NAME = {"float32": "F32", "bfloat16": "BF16"}
_DROP = ("transformers_version", "_name_or_path")


@dataclasses.dataclass(frozen=True)
class Written:
  tensors: int
  bytes: int
  seconds: float
  dst: str

  def line(self) -> str:
    return (f"initialised {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {self.seconds:.1f} s "
            f"({self.bytes / 1e9 / max(self.seconds, 1e-9):.2f} GB/s) -> {self.dst}")


# ----------------------------------------------------------------------------- side files
def llm_config_json(init: HFInit) -> dict[str, Any]:
  """The LLM folder's config.json with the final vocab_size (BAGEL's own fields stay in bagel_config.json)."""
  out = {k: v for k, v in init.llm.config.items() if k not in _DROP}
  out["vocab_size"] = init.cfg.llm.vocab_size
  if "tie_word_embeddings" in out:
    out["tie_word_embeddings"] = init.cfg.llm.tie_word_embeddings
  return out


def vit_config_json(init: HFInit) -> dict[str, Any]:
  """SigLIP's vision config with num_hidden_layers = layers used + 1 (the loaders build one fewer)."""
  raw = init.vit.config
  src = raw.get("vision_config", raw) if raw.get("model_type") == "siglip" else raw
  out = {k: v for k, v in src.items() if k not in _DROP}
  out.setdefault("model_type", "siglip_vision_model")
  out["num_hidden_layers"] = init.cfg.vit.num_hidden_layers + 1
  return out


def bagel_config_json(init: HFInit) -> dict[str, Any]:
  """BAGEL's settings, in the format `bagel_jax.config.load_config` reads."""
  from bagel_jax.tokenizer import SPECIAL_NAMES
  c = init.cfg
  return {
      "_comment": "BAGEL settings of a model initialised from Hugging Face checkpoints (upstream's main()); "
                  "vit_config.json lists num_hidden_layers = layers used + 1, as the release does.",
      "visual_gen": c.visual_gen, "visual_und": c.visual_und, "latent_patch_size": c.latent_patch_size,
      "max_latent_size": c.max_latent_size, "vit_max_num_patch_per_side": c.vit_max_num_patch_per_side,
      "connector_act": c.connector_act, "interpolate_pos": c.interpolate_pos, "timestep_shift": c.timestep_shift,
      "llm": {"qk_norm": c.llm.qk_norm, "tie_word_embeddings": c.llm.tie_word_embeddings,
              "layer_module": c.llm.layer_module},
      "vit": {"rope": False, "num_hidden_layers_used": c.vit.num_hidden_layers, "hidden_act": c.vit.hidden_act,
              "layer_norm_eps": c.vit.layer_norm_eps},
      "vae": dataclasses.asdict(c.vae),
      "latent_downsample": c.latent_downsample,
      "special_token_ids": dataclasses.asdict(c.tokens),
      "special_tokens": dict(SPECIAL_NAMES),
      "frequency_embedding_size": c.frequency_embedding_size,
  }


def side_texts(init: HFInit) -> dict[str, str]:
  """Every small file of the output folder but conversion.json: configs and tokenizer files."""
  from bagel_jax.weights.hf_tokenizer import tokenizer_config_json, tokenizer_json
  dump = lambda d: json.dumps(d, indent=2, ensure_ascii=False) + "\n"  # noqa: E731
  out = {p.name: p.read_text(encoding="utf-8") for p in side_files(init.vocab.folder) if p.name != "config.json"}
  gen = init.llm.folder / "generation_config.json"
  if gen.is_file():
    out.setdefault(gen.name, gen.read_text(encoding="utf-8"))
  out["tokenizer.json"] = tokenizer_json(init.vocab, init.rule)
  cfg = tokenizer_config_json(init.vocab, init.rule)
  if cfg is not None:
    out["tokenizer_config.json"] = cfg
  out.update({"llm_config.json": dump(llm_config_json(init)), "vit_config.json": dump(vit_config_json(init)),
              "bagel_config.json": dump(bagel_config_json(init))})
  return out


def conversion_info(init: HFInit, fmt: str, dtype: str) -> dict[str, Any]:
  a = init.args
  return {
      "format": FORMAT if fmt == "orbax" else "bagel release layout",
      "source": "hf_init", "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "dtype": dtype, "args": dataclasses.asdict(a),
      "vocab": {"len_tokenizer": init.rule.len_tokenizer, "new_tokens": list(init.rule.new_tokens),
                "rows_before": init.hf_vocab_size, "rows": init.rule.rows},
      "dropped": init.dropped_keys(),
      "origins": {k: s.origin for (_, k), s in sorted(init.sources.items())},
      "config": dataclasses.asdict(init.cfg),
  }


# ----------------------------------------------------------------------------- weights
def _write_ema(init: HFInit, path: pathlib.Path, dtype: str, on_tensor: Callable[[int], None]) -> int:
  keys = sorted(init.keys("ema"))
  st = _ST_NAME[dtype]
  w = SafetensorsWriter(path, [(k, init.shape_dtype("ema", k)[0], st) for k in keys])
  for k in keys:
    x = init.read("ema", k)
    w.write(k, x if dtype == "float32" else x.astype(np_dtype(st)))
    on_tensor(x.nbytes)
    del x  # before the next tensor is made: one at a time
  w.close()
  return w.nbytes


def _write_ae(init: HFInit, path: pathlib.Path, on_tensor: Callable[[int], None]) -> int:
  """The VAE as load_ae reads it: the file itself when it holds exactly the table's float32 keys."""
  keys = sorted(init.keys("ae"))
  ents = init.ae.entries
  if set(ents) == set(keys) and all(e.dtype == "F32" for e in ents.values()):
    shutil.copyfile(init.ae.path, path)
    n = sum(e.nbytes for e in ents.values())
    on_tensor(n)
    return n
  w = SafetensorsWriter(path, [(k, init.shape_dtype("ae", k)[0], "F32") for k in keys])
  for k in keys:
    x = init.read("ae", k)
    w.write(k, x)
    on_tensor(x.nbytes)
    del x
  w.close()
  return w.nbytes


def write(init: HFInit, dst, *, fmt: str = "safetensors", dtype: str = "float32", overwrite: bool = False,
          on_tensor: Callable[[int], None] | None = None) -> Written:
  """Writes the initial state to `dst` (atomically: the folder appears complete or not at all)."""
  from bagel_jax.weights.stream_tree import save_source_orbax
  if fmt not in FORMATS:
    raise CheckpointError(f"--format {fmt}: expected one of {FORMATS}")
  if dtype not in DTYPES:
    raise CheckpointError(f"--dtype {dtype}: expected one of {DTYPES}")
  t0 = time.perf_counter()
  dst = pathlib.Path(dst).absolute()
  check_destination(dst, overwrite)
  release_freed_buffers()
  texts = side_texts(init)  # tokenizer and config refusals before anything is written
  cb = on_tensor or (lambda n: None)
  with AtomicDir(dst, overwrite=overwrite) as out:
    if fmt == "safetensors":
      n = _write_ema(init, out.path / "ema.safetensors", dtype, cb) + _write_ae(init, out.path / "ae.safetensors", cb)
    else:
      n = save_source_orbax(init, init.cfg, out.path / STATE_DIR, dtype=dtype, register_cancel=out.on_abort,
                            on_piece=lambda name, b: cb(b))
    for name, text in texts.items():
      (out.path / name).write_text(text, encoding="utf-8")
    (out.path / CONVERSION_FILE).write_text(json.dumps(conversion_info(init, fmt, dtype), indent=1) + "\n")
    out.commit()
  return Written(len(init.sources), n, time.perf_counter() - t0, str(dst))


__all__ = ["write", "Written", "FORMATS", "DTYPES", "llm_config_json", "vit_config_json", "bagel_config_json",
           "side_texts"]
