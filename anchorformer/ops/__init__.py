"""Operators: the anchor attention and its fused kernels."""

from .anchor_attention import anchor_attention, anchor_attention_reference

__all__ = ["anchor_attention", "anchor_attention_reference"]
