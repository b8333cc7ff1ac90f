"""Attention and sampling kernels: each fused kernel sits beside the plain-torch reference it must match."""
from vivace.kernels.paged_attention import paged_decode_attention, paged_prefill_attention, store_kv

__all__ = ["paged_decode_attention", "paged_prefill_attention", "store_kv"]
