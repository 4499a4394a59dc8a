"""The one table between upstream tensor names/layouts and our parameter tree.

Our parameters are a pure dict `{"bagel": {...}, "vae": {...}}` (the pure-dict form of
the NNX states of `Bagel` and `AutoEncoder`).  Each `Rule` maps one upstream tensor
(`file` is "ema" for ema.safetensors, "ae" for ae.safetensors) to a parameter path,
optionally to one slice `index` of a stacked parameter (layer, expert), with a layout
transform.  `to_ours` / `to_upstream` apply a transform in either direction; the loader
and the converters only ever go through this table.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from bagel_jax.config import BagelConfig
from bagel_jax.weights.errors import CheckpointError

# Layout transforms: upstream layout -> ours.
IDENTITY = "identity"
LINEAR = "linear"  # torch Linear weight [out, in] -> kernel [in, out]
CONV = "conv"  # torch Conv2d weight [O, I, kh, kw] -> kernel [kh, kw, I, O]


@dataclasses.dataclass(frozen=True)
class Rule:
  upstream: str
  path: tuple[str, ...]
  kind: str = IDENTITY
  index: tuple[int, ...] = ()  # slice of a stacked parameter (e.g. (layer, expert))
  file: str = "ema"


# kind -> (axes permutation upstream -> ours, ours -> upstream); IDENTITY is absent.
_PERMUTATIONS = {LINEAR: ((1, 0), (1, 0)), CONV: ((2, 3, 1, 0), (3, 2, 0, 1))}


def _permute(kind: str, x: np.ndarray, direction: int) -> np.ndarray:
  if kind == IDENTITY:
    return x
  if kind not in _PERMUTATIONS:
    raise ValueError(f"unknown layout transform {kind!r}")
  return np.ascontiguousarray(x.transpose(_PERMUTATIONS[kind][direction]))


def to_ours(kind: str, x: np.ndarray) -> np.ndarray:
  return _permute(kind, x, 0)


def to_upstream(kind: str, x: np.ndarray) -> np.ndarray:
  return _permute(kind, x, 1)


def upstream_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
  if kind == IDENTITY:
    return tuple(ours)
  if kind not in _PERMUTATIONS:
    raise ValueError(f"unknown layout transform {kind!r}")
  return tuple(ours[a] for a in _PERMUTATIONS[kind][1])


# ----------------------------------------------------------------------------- VAE (ae.safetensors)
def _vae_rules(cfg: BagelConfig) -> Iterator[Rule]:
  """FLUX AE keys (ae.safetensors, float32) -> ("vae", ...) paths of `AutoEncoder`.

  Conv2d weights (1x1 attention q/k/v/proj_out and nin_shortcut included) are nnx.Conv
  kernels [kh, kw, I, O]; GroupNorm weight/bias are scale/bias.  List indices (`down.1`,
  `block.0`) are int keys, as in the NNX pure dict.
  """
  vae = cfg.vae
  mult = tuple(vae.ch_mult)
  n = len(mult)

  def conv(up: str, path: tuple) -> Iterator[Rule]:
    yield Rule(f"{up}.weight", ("vae",) + path + ("kernel",), CONV, file="ae")
    yield Rule(f"{up}.bias", ("vae",) + path + ("bias",), IDENTITY, file="ae")

  def norm(up: str, path: tuple) -> Iterator[Rule]:
    yield Rule(f"{up}.weight", ("vae",) + path + ("scale",), IDENTITY, file="ae")
    yield Rule(f"{up}.bias", ("vae",) + path + ("bias",), IDENTITY, file="ae")

  def resnet(up: str, path: tuple, cin: int, cout: int) -> Iterator[Rule]:
    yield from norm(f"{up}.norm1", path + ("norm1",))
    yield from conv(f"{up}.conv1", path + ("conv1",))
    yield from norm(f"{up}.norm2", path + ("norm2",))
    yield from conv(f"{up}.conv2", path + ("conv2",))
    if cin != cout:
      yield from conv(f"{up}.nin_shortcut", path + ("nin_shortcut",))

  def mid(up: str, path: tuple, c: int) -> Iterator[Rule]:
    yield from resnet(f"{up}.block_1", path + ("block_1",), c, c)
    yield from norm(f"{up}.attn_1.norm", path + ("attn_1", "norm"))
    for name in ("q", "k", "v", "proj_out"):
      yield from conv(f"{up}.attn_1.{name}", path + ("attn_1", name))
    yield from resnet(f"{up}.block_2", path + ("block_2",), c, c)

  # Encoder: level i goes ch*([1]+mult)[i] -> ch*mult[i]; a downsample after every level but the last.
  chans = [vae.ch] + [vae.ch * m for m in mult]
  yield from conv("encoder.conv_in", ("encoder", "conv_in"))
  for i in range(n):
    for j in range(vae.num_res_blocks):
      yield from resnet(f"encoder.down.{i}.block.{j}", ("encoder", "down", i, "block", j),
                        chans[i] if j == 0 else chans[i + 1], chans[i + 1])
    if i < n - 1:
      yield from conv(f"encoder.down.{i}.downsample.conv", ("encoder", "down", i, "downsample", "conv"))
  yield from mid("encoder.mid", ("encoder", "mid"), chans[-1])
  yield from norm("encoder.norm_out", ("encoder", "norm_out"))
  yield from conv("encoder.conv_out", ("encoder", "conv_out"))

  # Decoder: up.i is level i (up.0 the highest resolution), entered from level i+1's channels.
  top = vae.ch * mult[-1]
  yield from conv("decoder.conv_in", ("decoder", "conv_in"))
  yield from mid("decoder.mid", ("decoder", "mid"), top)
  for i in range(n):
    cin, cout = (vae.ch * mult[i + 1] if i < n - 1 else top), vae.ch * mult[i]
    for j in range(vae.num_res_blocks + 1):
      yield from resnet(f"decoder.up.{i}.block.{j}", ("decoder", "up", i, "block", j), cin if j == 0 else cout, cout)
    if i > 0:
      yield from conv(f"decoder.up.{i}.upsample.conv", ("decoder", "up", i, "upsample", "conv"))
  yield from norm("decoder.norm_out", ("decoder", "norm_out"))
  yield from conv("decoder.conv_out", ("decoder", "conv_out"))


# ----------------------------------------------------------------------------- LLM (ema.safetensors)
_LLM_LAYER_PARAMS = (
    # (upstream name with {g} for the gen suffix, our path under llm.layers, transform)
    ("input_layernorm{g}.weight", ("input_layernorm",), IDENTITY),
    ("post_attention_layernorm{g}.weight", ("post_attention_layernorm",), IDENTITY),
    ("self_attn.q_proj{g}.weight", ("q_proj", "kernel"), LINEAR),
    ("self_attn.q_proj{g}.bias", ("q_proj", "bias"), IDENTITY),
    ("self_attn.k_proj{g}.weight", ("k_proj", "kernel"), LINEAR),
    ("self_attn.k_proj{g}.bias", ("k_proj", "bias"), IDENTITY),
    ("self_attn.v_proj{g}.weight", ("v_proj", "kernel"), LINEAR),
    ("self_attn.v_proj{g}.bias", ("v_proj", "bias"), IDENTITY),
    ("self_attn.o_proj{g}.weight", ("o_proj", "kernel"), LINEAR),
    ("self_attn.q_norm{g}.weight", ("q_norm",), IDENTITY),
    ("self_attn.k_norm{g}.weight", ("k_norm",), IDENTITY),
    ("mlp{g}.gate_proj.weight", ("gate_proj", "kernel"), LINEAR),
    ("mlp{g}.up_proj.weight", ("up_proj", "kernel"), LINEAR),
    ("mlp{g}.down_proj.weight", ("down_proj", "kernel"), LINEAR),
)
_EXPERT_SUFFIX = ("", "_moe_gen")


_EMBED = ("language_model.model.embed_tokens.weight", ("bagel", "llm", "embed_tokens"))
_LM_HEAD = "language_model.lm_head.weight"


def _llm_rules(cfg: BagelConfig) -> Iterator[Rule]:
  """The LLM's tensors.  qk_norm=False: no q_norm / k_norm (upstream's nn.Identity has no weight);
  tie_word_embeddings: no lm_head of ours (see `tied_rules` for the key upstream still writes)."""
  llm = ("bagel", "llm")
  yield Rule(*_EMBED)
  if not cfg.llm.tie_word_embeddings:
    yield Rule(_LM_HEAD, llm + ("lm_head",), LINEAR)
  for e, g in enumerate(_EXPERT_SUFFIX):
    yield Rule(f"language_model.model.norm{g}.weight", llm + ("norm",), IDENTITY, (e,))
  skip = () if cfg.llm.qk_norm else (("q_norm",), ("k_norm",))
  for n in range(cfg.llm.num_hidden_layers):
    for name, path, kind in _LLM_LAYER_PARAMS:
      if path in skip:
        continue
      for e, g in enumerate(_EXPERT_SUFFIX):
        yield Rule(f"language_model.model.layers.{n}.{name.format(g=g)}", llm + ("layers",) + path, kind, (n, e))


def _latent_rules(cfg: BagelConfig) -> Iterator[Rule]:
  if cfg.visual_und:
    yield Rule("vit_pos_embed.pos_embed", ("bagel", "vit_pos_embed"))
  if cfg.visual_gen:
    yield Rule("latent_pos_embed.pos_embed", ("bagel", "latent_pos_embed"))
    for name in ("vae2llm", "llm2vae"):
      yield Rule(f"{name}.weight", ("bagel", name, "kernel"), LINEAR)
      yield Rule(f"{name}.bias", ("bagel", name, "bias"))


def _vit_rules(cfg: BagelConfig) -> Iterator[Rule]:
  """vit_model.* and connector.* (if visual_und), time_embedder.* (if visual_gen).

  The ViT patch embedding is stored as upstream's converted Linear [hidden, 3*p*p] with
  input order (row in patch, col in patch, channel), which is our patchify order: a plain
  transpose.  Encoder layers are stacked: Rule.index = (layer,).
  """
  layer_params = (
      # (upstream name under vit_model.vision_model.encoder.layers.N, our path under vit.layers, transform)
      ("layer_norm1.weight", ("layer_norm1", "scale"), IDENTITY),
      ("layer_norm1.bias", ("layer_norm1", "bias"), IDENTITY),
      ("self_attn.q_proj.weight", ("q_proj", "kernel"), LINEAR),
      ("self_attn.q_proj.bias", ("q_proj", "bias"), IDENTITY),
      ("self_attn.k_proj.weight", ("k_proj", "kernel"), LINEAR),
      ("self_attn.k_proj.bias", ("k_proj", "bias"), IDENTITY),
      ("self_attn.v_proj.weight", ("v_proj", "kernel"), LINEAR),
      ("self_attn.v_proj.bias", ("v_proj", "bias"), IDENTITY),
      ("self_attn.out_proj.weight", ("out_proj", "kernel"), LINEAR),
      ("self_attn.out_proj.bias", ("out_proj", "bias"), IDENTITY),
      ("layer_norm2.weight", ("layer_norm2", "scale"), IDENTITY),
      ("layer_norm2.bias", ("layer_norm2", "bias"), IDENTITY),
      ("mlp.fc1.weight", ("fc1", "kernel"), LINEAR),
      ("mlp.fc1.bias", ("fc1", "bias"), IDENTITY),
      ("mlp.fc2.weight", ("fc2", "kernel"), LINEAR),
      ("mlp.fc2.bias", ("fc2", "bias"), IDENTITY),
  )
  if cfg.visual_und:
    vm, vit = "vit_model.vision_model", ("bagel", "vit")
    yield Rule(f"{vm}.embeddings.patch_embedding.weight", vit + ("patch_embedding", "kernel"), LINEAR)
    yield Rule(f"{vm}.embeddings.patch_embedding.bias", vit + ("patch_embedding", "bias"))
    yield Rule(f"{vm}.embeddings.position_embedding.weight", vit + ("position_embedding",))
    for n in range(cfg.vit.num_hidden_layers):
      for name, path, kind in layer_params:
        yield Rule(f"{vm}.encoder.layers.{n}.{name}", vit + ("layers",) + path, kind, (n,))
    yield Rule(f"{vm}.post_layernorm.weight", vit + ("post_layernorm", "scale"))
    yield Rule(f"{vm}.post_layernorm.bias", vit + ("post_layernorm", "bias"))
    for fc in ("fc1", "fc2"):
      yield Rule(f"connector.{fc}.weight", ("bagel", "connector", fc, "kernel"), LINEAR)
      yield Rule(f"connector.{fc}.bias", ("bagel", "connector", fc, "bias"))
  if cfg.visual_gen:
    for i, ours in ((0, "mlp_in"), (2, "mlp_out")):
      yield Rule(f"time_embedder.mlp.{i}.weight", ("bagel", "time_embedder", ours, "kernel"), LINEAR)
      yield Rule(f"time_embedder.mlp.{i}.bias", ("bagel", "time_embedder", ours, "bias"))


def rules(cfg: BagelConfig) -> list[Rule]:
  """Every upstream tensor that provides a parameter, for this config (what loaders read)."""
  return [*_llm_rules(cfg), *_vit_rules(cfg), *_latent_rules(cfg), *_vae_rules(cfg)]


def tied_rules(cfg: BagelConfig) -> list[Rule]:
  """Upstream tensors that repeat a parameter: with tie_word_embeddings, `language_model.lm_head.weight`
  is embed_tokens itself, and upstream's state dict (so its ema.safetensors) still lists it.
  Writers write them; loaders take them as optional (shape-checked, not read)."""
  return [Rule(_LM_HEAD, _EMBED[1])] if cfg.llm.tie_word_embeddings else []


def release_rules(cfg: BagelConfig) -> list[Rule]:
  """Every tensor of the release layout upstream writes for this config: `rules` + `tied_rules`."""
  return rules(cfg) + tied_rules(cfg)


# ----------------------------------------------------------------------------- loading an upstream folder
FILE_NAMES = {"ema": "ema.safetensors", "ae": "ae.safetensors"}
FILE_DTYPES = {"ema": "BF16", "ae": "F32"}  # the release's dtypes, per file
# Also accepted when most of a file holds it: F32 ema (a float32 init, `convert.hf_to_bagel`).
FILE_DTYPES_ALSO = {"ema": ("F32",), "ae": ()}
_ST_TO_NP = {"BF16": "bfloat16", "F32": "float32", "F16": "float16", "F64": "float64"}


def _get(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def expected_upstream_shape(rule: Rule, abstract: dict) -> tuple[int, ...]:
  leaf = _get(abstract, rule.path)
  shape = tuple(leaf.shape)[len(rule.index):]
  return upstream_shape(rule.kind, shape)


class UpstreamFiles:
  """The safetensors files of an upstream folder, opened lazily (memory-mapped).

  The ema weights may be one `ema.safetensors` or shards listed by a
  `*.safetensors.index.json` ("weight_map": key -> file).
  """

  def __init__(self, folder):
    import json
    import pathlib

    from safetensors import safe_open

    self.folder = pathlib.Path(folder)
    if not self.folder.is_dir():
      raise CheckpointError(f"{self.folder}: checkpoint folder not found")
    self._open = lambda f: safe_open(str(f), framework="numpy")
    self._handles: dict = {}
    self.key_file: dict[tuple[str, str], "pathlib.Path"] = {}
    ema = self.folder / FILE_NAMES["ema"]
    indexes = sorted(self.folder.glob("*.safetensors.index.json"))
    if ema.is_file():
      ema_files = {None: ema}
    elif indexes:
      try:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{indexes[0]}: not a valid safetensors index ({e})") from None
      ema_files = {k: self.folder / f for k, f in weight_map.items()}
      for f in set(ema_files.values()):
        if not f.is_file():
          raise CheckpointError(f"{f}: shard listed in {indexes[0].name} not found")
    else:
      raise CheckpointError(f"{ema}: file not found")
    ae = self.folder / FILE_NAMES["ae"]
    if not ae.is_file():
      raise CheckpointError(f"{ae}: file not found")
    for f in {*ema_files.values(), ae}:
      for k in self._handle(f).keys():
        file_id = "ae" if f == ae else "ema"
        if file_id == "ema" and None not in ema_files and ema_files.get(k) != f:
          raise CheckpointError(f"{f}: key {k} is not listed for this shard in the index")
        self.key_file[(file_id, k)] = f

  def _handle(self, f):
    if f not in self._handles:
      try:
        self._handles[f] = self._open(f)
      except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{f}: cannot read safetensors header ({e})") from None
    return self._handles[f]

  def keys(self, file_id: str) -> set[str]:
    return {k for (fid, k) in self.key_file if fid == file_id}

  def shape_dtype(self, file_id: str, key: str) -> tuple[tuple[int, ...], str]:
    sl = self._handle(self.key_file[(file_id, key)]).get_slice(key)
    return tuple(sl.get_shape()), sl.get_dtype()

  def read(self, file_id: str, key: str):
    f = self.key_file[(file_id, key)]
    try:
      return self._handle(f).get_tensor(key)
    except Exception as e:
      raise CheckpointError(f"{f}: cannot read tensor {key} ({e})") from None


def validate(files: UpstreamFiles, table: list[Rule], abstract: dict, *, allow_extra: bool = False,
             check_dtype: bool = True, optional: list[Rule] = ()) -> None:
  """Checks keys, shapes and dtypes against the table before any tensor is read.

  `optional` (`tied_rules`): keys that may be present or not; shape-checked when present.
  """
  for r in optional:
    if (r.file, r.upstream) in files.key_file:
      shape, exp = files.shape_dtype(r.file, r.upstream)[0], expected_upstream_shape(r, abstract)
      if tuple(shape) != exp:
        raise CheckpointError(f"{files.key_file[(r.file, r.upstream)]}: key {r.upstream} has shape {list(shape)}, "
                              f"expected {list(exp)} (tied to {_EMBED[0]})")
  for file_id in FILE_NAMES:
    want = {r.upstream for r in table if r.file == file_id}
    have = files.keys(file_id) - {r.upstream for r in optional if r.file == file_id}
    missing = sorted(want - have)
    if missing:
      raise CheckpointError(f"{files.folder / FILE_NAMES[file_id]}: missing key {missing[0]}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(have - want)
    if extra and not allow_extra:
      raise CheckpointError(f"{files.folder / FILE_NAMES[file_id]}: unexpected key {extra[0]}"
                            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  want = _file_dtypes(files, table)
  for r in table:
    shape, dtype = files.shape_dtype(r.file, r.upstream)
    exp = expected_upstream_shape(r, abstract)
    if shape != exp:
      raise CheckpointError(f"{files.key_file[(r.file, r.upstream)]}: key {r.upstream} has shape {list(shape)}, "
                            f"expected {list(exp)}")
    if check_dtype and dtype != want[r.file]:
      raise CheckpointError(f"{files.key_file[(r.file, r.upstream)]}: key {r.upstream} has dtype {dtype}, "
                            f"expected {want[r.file]}")


def _file_dtypes(files, table: list[Rule]) -> dict[str, str]:
  """Each file's dtype throughout: the release's, or an accepted alternative most of its tensors have."""
  import collections
  out = {}
  for file_id, release in FILE_DTYPES.items():
    counts = collections.Counter(files.shape_dtype(r.file, r.upstream)[1] for r in table if r.file == file_id)
    top = counts.most_common(1)[0][0] if counts else release
    out[file_id] = top if top in FILE_DTYPES_ALSO[file_id] else release
  return out


def load_upstream(folder, cfg: BagelConfig, abstract: dict, *, dtype=None, allow_extra: bool = False) -> dict:
  """Reads an upstream-format folder into our pure-dict parameters (numpy arrays).

  `abstract` is the pure dict of ShapeDtypeStructs of {"bagel": ..., "vae": ...}; each
  parameter is assembled in host memory from its rules and cast to `dtype` (default:
  the abstract dtype).
  """
  files = UpstreamFiles(folder)
  table = rules(cfg)
  validate(files, table, abstract, allow_extra=allow_extra, optional=tied_rules(cfg))
  out: dict = {}
  for r in table:
    leaf = _get(abstract, r.path)
    target_dtype = np.dtype(dtype or leaf.dtype)
    try:
      arr = _get(out, r.path)
    except KeyError:
      arr = np.zeros(leaf.shape, target_dtype) if r.index else None
    value = to_ours(r.kind, files.read(r.file, r.upstream)).astype(target_dtype)
    if r.index:
      arr[r.index] = value
    else:
      arr = value
    _set(out, r.path, arr)
  missing = [p for p in _paths(abstract) if not _has(out, p)]
  if missing:
    raise CheckpointError(f"{folder}: no upstream tensor provides parameter {'/'.join(map(str, missing[0]))}")
  return out


def _paths(tree: dict, prefix: tuple = ()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,)


def _has(tree: dict, path: tuple) -> bool:
  try:
    _get(tree, path)
    return True
  except (KeyError, TypeError):
    return False
