"""Attention over BAGEL's interval mask."""

from bagel_jax.attention.api import IMPLS, BackendUnavailable, attention, choose_impl
from bagel_jax.attention.mask import dense_mask

__all__ = ["IMPLS", "BackendUnavailable", "attention", "choose_impl", "dense_mask"]
