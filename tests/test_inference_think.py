"""Think mode (plan, then image) and weight-only int8 inference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.api import BagelModel
from bagel_jax.config import load_config
from bagel_jax.inference import Inferencer, load_tokenizer
from bagel_jax.inference import kv_cache as kc
from bagel_jax.inference.inferencer import GEN_THINK_SYSTEM_PROMPT
from bagel_jax.inference.quantize import QuantizedArray, param_bytes, quantize_params
from tests.conftest import FIXTURE_DIR, rel_err

TOKENIZER = FIXTURE_DIR.parent / "tokenizer" / "tokenizer.json"
T2I = dict(num_timesteps=4, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0),
           cfg_renorm_type="global")


@pytest.fixture(scope="module")
def inf():
  cfg = load_config(FIXTURE_DIR)
  model = BagelModel(cfg, attention_impl="reference")
  return Inferencer(model, model.load_upstream(FIXTURE_DIR), load_tokenizer(TOKENIZER))


def test_think_mode_contexts(inf):
  [plan, img] = inf.interleave_inference(["a lighthouse at sunset"], think=True, max_think_token_n=6,
                                         image_shapes=(24, 24), record=True, **T2I)
  assert isinstance(plan, str) and img.size == (24, 24)
  w = inf.last["where"]
  sys_len = len(inf.tokenizer.encode(GEN_THINK_SYSTEM_PROMPT)) + 2
  prompt_len = len(inf.tokenizer.encode("a lighthouse at sunset")) + 2
  # upstream: gen = [system, prompt, plan]; cfg_text = [system]; both read one cache row.
  assert w[(0, "cfg_text")] == (w[(0, "gen")][0], sys_len, sys_len)
  assert w[(0, "gen")][1] == sys_len + prompt_len  # before the plan was appended
  tokens = inf.last["tokens"][0]
  assert tokens[0] == 500 and len(tokens) <= 6


def test_plan_enters_the_generation_context_before_denoising(inf):
  """Think mode: at denoising time the gen context is [system, prompt, plan] (its length, and its
  keys/values equal a fresh prefill of those three segments), cfg_text stays [system]; and the image
  differs from think=False with the same initial noise."""
  noise = [np.random.default_rng(0).standard_normal((9, inf.cfg.patch_latent_dim)).astype(np.float32)]
  kw = dict(image_shapes=(24, 24), init_noise=noise, record=True, output="array", **T2I)
  [plan, img] = inf.interleave_inference(["a lighthouse at sunset"], think=True, max_think_token_n=6, **kw)
  segs = [inf._encode_text(GEN_THINK_SYSTEM_PROMPT), inf._encode_text("a lighthouse at sunset"), inf._encode_text(plan)]
  assert segs[2].num_tokens > 2  # <|im_start|> + at least one planned token + <|im_end|>
  [g] = inf.last["groups"]
  ctx = g["contexts"]  # rows: gen, cfg_text
  lengths = np.asarray(ctx.lengths)
  assert lengths.tolist() == [sum(s.num_tokens for s in segs), segs[0].num_tokens]
  n = int(lengths[0])
  ref = kc.prefill(inf.model, inf.params, jax.tree.map(jnp.asarray, kc.build_chunk([segs], [0], inf.cfg)), kc.bucket(n))
  assert rel_err(ctx.k[:, 0, :n], ref.k[:, 0, :n]) < 1e-5 and rel_err(ctx.v[:, 0, :n], ref.v[:, 0, :n]) < 1e-5
  assert int(ctx.next_rope[0]) == int(ref.next_rope[0])
  [plain] = inf.interleave_inference(["a lighthouse at sunset"], think=False, **kw)
  assert int(inf.last["groups"][0]["contexts"].lengths[0]) == segs[1].num_tokens  # gen = [prompt]
  assert np.abs(img.astype(int) - plain.astype(int)).mean() > 1.0  # the plan changed the image


def test_int8_weights(inf):
  q = quantize_params(inf.params)
  layers = q["bagel"]["llm"]["layers"]
  assert isinstance(layers["gate_proj"]["kernel"], QuantizedArray)
  assert layers["gate_proj"]["kernel"].q.dtype == jnp.int8
  assert param_bytes(q) < param_bytes(inf.params)
  w = inf.params["bagel"]["llm"]["layers"]["gate_proj"]["kernel"]
  assert rel_err(layers["gate_proj"]["kernel"].dequantize(), w) < 1e-2
  # The unchanged decoder runs on the int8 kernels: a prefill's keys/values stay close.
  chunk = jax.tree.map(jnp.asarray, kc.build_chunk([[kc.TextSegment(tuple(range(40, 60)))]], [0], inf.cfg))
  ref = kc.prefill(inf.model, inf.params, chunk, 32)
  got = kc.prefill(inf.model, q, chunk, 32)
  assert rel_err(got.k, ref.k) < 3e-2 and rel_err(got.v, ref.v) < 3e-2


@pytest.mark.parametrize("think", [False, True])
@pytest.mark.parametrize("edit", [False, True])
def test_contexts_follow_upstream(inf, think, edit):
  """The dossier's table (section 5.2): T2I, T2I + think, Edit, Edit + think (before the plan is appended)."""
  from bagel_jax.inference import ImageInput
  from bagel_jax.inference.inferencer import assign_rows
  import numpy as np
  items = ([ImageInput(vae=np.zeros((16, 24, 3), np.float32), vit=np.zeros((14, 28, 3), np.float32))] if edit else [])
  req = inf._build(items + ["a prompt"], think, False, (24, 24), jax.random.key(0))
  kinds = {nm: [type(s).__name__[:3] for s in segs] for nm, segs in req.contexts.items()}
  sys_ = ["Tex"] if think else []
  img = ["Vae", "Vit"] if edit else []
  assert kinds["gen"] == sys_ + img + ["Tex"]
  assert kinds["cfg_text"] == sys_ + img
  assert kinds["cfg_img"] == sys_ + ["Tex"]
  assert req.image_shape == ((16, 24) if edit else (24, 24))
  rows, where = assign_rows([req.contexts], ["gen", "cfg_text", "cfg_img"])
  assert where[(0, "cfg_text")][0] == where[(0, "gen")][0]  # always a prefix of gen: no second prefill
  assert (where[(0, "cfg_img")][0] == where[(0, "gen")][0]) == (not edit)  # T2I: cfg_img equals gen's prefix
  assert len(rows) == (2 if edit else 1)
  if edit:  # cfg_img has no images: its rope ids are gen's less one per image (VAE, ViT)
    assert where[(0, "cfg_img")][2] == where[(0, "gen")][2] - 2
