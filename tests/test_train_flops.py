"""MFU FLOP count as upstream's `qwen2_flop_coefficients`, and the trainer's micro-batch merge."""

from __future__ import annotations

import numpy as np

from bagel_jax.config import LLMConfig
from bagel_jax.train.flops import qwen2_flop_coefficients, step_flops
from bagel_jax.train.loop import next_batch
from tests.train_fixtures import tiny_batch, tiny_model


def test_coefficients_by_hand():
  # hidden 4, MLP 6, 2 layers, 2 query heads / 1 KV head of 2, vocab 10:
  # MLP 3*4*6 = 72, attention projections 4*(4+2+2+4) = 48, embedding + LM head 2*10*4 = 80
  llm = LLMConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1)
  assert qwen2_flop_coefficients(llm) == (6.0 * ((72 + 48) * 2 + 80), 12.0 * 2 * 2 * 2)
  assert step_flops(llm, 100, 50.0**2 + 50.0**2) == 1920.0 * 100 + 96.0 * 5000


def test_next_batch_interleaves_micro_batches_and_sums_tokens():
  cfg = tiny_model().cfg
  parts = [tiny_batch(cfg, 2, s) for s in (0, 1)]
  feed = iter([({"layout": b.layout, "vit_patches": b.vit_patches, "vae_images": b.vae_images},
                {"tokens": 10 * (i + 1), "samples": 3, "skipped": i}) for i, b in enumerate(parts)])
  batch, info = next_batch(feed, 2)
  assert info["tokens"] == 30 and info["skipped"] == 1 and info["tokens_sq"] > 0
  ids = np.asarray(batch.layout.text_ids)
  for r in range(2):
    for n in range(2):
      np.testing.assert_array_equal(ids[r * 2 + n], np.asarray(parts[n].layout.text_ids)[r])
  np.testing.assert_array_equal(np.asarray(batch.vae_images)[3], np.asarray(parts[1].vae_images)[1])
