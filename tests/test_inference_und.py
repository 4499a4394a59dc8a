"""Understanding with a KV cache: parity with upstream (fixture case und/), batching, sampling, tokenizer."""

import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.api import BagelModel
from bagel_jax.config import load_config
from bagel_jax.inference import ImageInput, Inferencer, load_tokenizer
from bagel_jax.inference.text import filter_logits
from bagel_jax.inference.text import strip_generated
from bagel_jax.tokenizer import check_special_tokens
from tests.conftest import FIXTURE_DIR, rel_err

TOL = 1e-4  # CASES.md: max(1e-4, 10 x the float32 noise floor 3.4e-7)
TOKENIZER = FIXTURE_DIR.parent / "tokenizer" / "tokenizer.json"


@pytest.fixture(scope="module")
def inf():
  cfg = load_config(FIXTURE_DIR)
  model = BagelModel(cfg, attention_impl="reference")
  return Inferencer(model, model.load_upstream(FIXTURE_DIR), None)


def _und_request(cases):
  return [ImageInput(vit=cases["und/image"].transpose(1, 2, 0)), cases["und/question_ids"].tolist()]


@pytest.fixture(scope="module")
def und(inf, cases):
  [tokens] = inf.interleave_inference(_und_request(cases), understanding_output=True, max_think_token_n=9,
                                      record=True)
  return tokens, dict(inf.last)


def test_greedy_tokens_identical(und, cases):
  tokens, _ = und
  np.testing.assert_array_equal(tokens, cases["und/tokens"])


def test_step_logits(und, cases):
  logits = und[1]["step_logits"][:9, 0]
  assert rel_err(logits, cases["und/step_logits"]) < TOL


def test_prefill_cache(und, cases):
  cache, where = und[1]["prefill_cache"], und[1]["where"]
  row, length, rope = where[(0, "gen")]
  assert (length, rope) == (22, 9)  # cases.json: the first decoding call has kv length 22, rope id 9
  assert int(cache.lengths[row]) == 22
  assert rel_err(cache.k[:, row, :22], cases["und/prefill_keys"]) < TOL
  assert rel_err(cache.v[:, row, :22], cases["und/prefill_values"]) < TOL


def test_batch_of_prompts_of_different_lengths(inf, cases, und):
  short = [cases["t2i/prompt_ids"].tolist()[:3]]
  both = inf.batch([_und_request(cases), short], understanding_output=True, max_think_token_n=9)
  alone = inf.batch([short], understanding_output=True, max_think_token_n=9)
  assert both[0][0] == und[0]
  assert both[1][0] == alone[0][0]


def test_sampling_is_seeded_and_respects_top_k(inf, cases):
  req = [_und_request(cases)]
  a = inf.batch(req, understanding_output=True, max_think_token_n=6, do_sample=True, text_temperature=1.0, seed=3)
  b = inf.batch(req, understanding_output=True, max_think_token_n=6, do_sample=True, text_temperature=1.0, seed=3)
  assert a == b
  # top_k = 1 is greedy
  g = inf.batch(req, understanding_output=True, max_think_token_n=6, do_sample=True, text_temperature=1.0, top_k=1)
  np.testing.assert_array_equal(g[0][0], cases["und/tokens"][:6])


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  assert np.isinf(np.asarray(filter_logits(logits, jnp.int32(2), jnp.float32(1.0)))[0, 2:]).all()
  np.testing.assert_array_equal(np.isinf(filter_logits(logits, jnp.int32(0), jnp.float32(0.7)))[0],
                                [False, False, True, True])  # 0.5 < 0.7, 0.5 + 0.3 covers it
  np.testing.assert_array_equal(np.isinf(filter_logits(logits, jnp.int32(0), jnp.float32(1.0)))[0], [False] * 4)
  np.testing.assert_array_equal(np.isinf(filter_logits(logits, jnp.int32(0), jnp.float32(0.1)))[0],
                                [False, True, True, True])


def test_tiny_tokenizer():
  tok = load_tokenizer(TOKENIZER)
  assert tok.vocab_size == 512
  ids = tok.encode("A red cat on a table.")
  assert max(ids) < 499 and tok.decode(ids) == "A red cat on a table."
  assert [tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")] == \
      [500, 501, 508, 509]
  check_special_tokens(tok, load_config(FIXTURE_DIR).tokens, 512)
  assert strip_generated(tok.decode([500] + ids)) == "A red cat on a table."
  assert strip_generated("<|im_start|>hi<|im_end|>junk") == "hi"


def test_chat_with_tokenizer_text(inf):
  tok = load_tokenizer(TOKENIZER)
  with_tok = Inferencer(inf.model, inf.params, tok)
  [text] = with_tok.interleave_inference(["What is this?"], understanding_output=True, max_think_token_n=5)
  ids = tok.encode("What is this?")
  [ref] = inf.interleave_inference([ids], understanding_output=True, max_think_token_n=5)
  assert text == strip_generated(tok.decode(ref))
