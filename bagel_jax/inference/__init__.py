"""Inference: KV caches, text decoding, the flow sampler with CFG, the interleaved inferencer."""

from bagel_jax.inference.errors import InferenceError
from bagel_jax.inference.contexts import CfgContext
from bagel_jax.inference.flow import FlowSettings, denoise, schedule, timestep_grid
from bagel_jax.inference.inferencer import ImageInput, Inferencer, load_image, load_video, preprocess_image
from bagel_jax.inference.kv_cache import KVCache, TextSegment, VaeSegment, VitSegment, extend, prefill
from bagel_jax.inference.text import generate_tokens
from bagel_jax.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = ["InferenceError", "CfgContext", "FlowSettings", "denoise", "schedule", "timestep_grid", "ImageInput", "Inferencer",
           "load_image", "load_video", "preprocess_image", "KVCache", "TextSegment", "VaeSegment", "VitSegment",
           "extend",
           "prefill", "generate_tokens", "Tokenizer", "TokenizerError", "load_tokenizer"]
