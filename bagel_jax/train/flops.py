"""Training FLOPs and MFU as upstream counts them (`qwen2_flop_coefficients`, PR #274).

    flops(step) = dense_token_factor * tokens + attn_factor * sum over packed samples of length^2

with, for the Qwen2 LLM (one expert per token, so the MoT counts like the dense model):

    dense_N = L * (3 * d * f  +  d * (q + k + v + o widths))  +  2 * vocab * d   (embedding + LM head)
    dense_token_factor = 6 * dense_N          (forward 2, backward 4 FLOPs per parameter and token)
    attn_factor        = 12 * head_dim * Hq * L   (QK^T and PV, forward and backward, full square)

Like upstream this counts the LM head on every token (we apply it on CE tokens only), ignores
the ViT, connector, VAE and the flow heads, and counts each sample's attention as a full
square (causal text halves the real work).  Tokens are all packed tokens of every micro-batch.
"""

from __future__ import annotations


def qwen2_flop_coefficients(llm) -> tuple[float, float]:
  """(dense FLOPs per token, attention FLOPs per squared sample length) for an LLMConfig."""
  d, hd = llm.hidden_size, llm.head_dim
  q, kv = llm.num_attention_heads * hd, llm.num_key_value_heads * hd
  mlp = 3 * d * llm.intermediate_size
  attn_linear = d * (q + 2 * kv + llm.num_attention_heads * hd)
  dense_n = (mlp + attn_linear) * llm.num_hidden_layers + 2 * llm.vocab_size * d
  return 6.0 * dense_n, 12.0 * hd * llm.num_attention_heads * llm.num_hidden_layers


def step_flops(llm, tokens: float, sum_sq_len: float) -> float:
  dense, attn = qwen2_flop_coefficients(llm)
  return dense * tokens + attn * sum_sq_len
