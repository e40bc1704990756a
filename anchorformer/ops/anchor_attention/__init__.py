"""The anchor-attention operator and its implementations.

``anchor_attention(qk, v, anchors, normalize=True, impl="auto")`` computes AnchorFormer's
bipartite attention (see ``reference.py`` for the maths). Implementations:

- ``"reference"``: plain PyTorch, any device, the ground truth for tests;
- ``"triton"``: fused Triton kernels (CUDA; on the CPU under the Triton interpreter, which
  needs ``TRITON_INTERPRET=1`` in the environment before triton and this package are imported;
  without it, CPU tensors get a ``ValueError`` saying so);
- ``"auto"``: Triton for CUDA tensors when Triton is importable, the reference otherwise.

The environment variable ``ANCHORFORMER_ATTN_IMPL`` overrides ``"auto"``. Shapes beyond the
kernels' limits (``limits.py``: D > 128, B*H > 65535) go to the reference under ``"auto"`` and
raise a ``ValueError`` under ``"triton"``. The Triton kernels reduce over tokens through
partials added in a fixed order (no atomics), so their results are bitwise reproducible with or
without ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import os

import torch

from .limits import fused_unsupported
from .reference import _reference_checked, anchor_attention_reference, anchor_probabilities, check_inputs

__all__ = [
    "IMPLS",
    "anchor_attention",
    "anchor_attention_reference",
    "anchor_probabilities",
    "resolve_impl",
]

IMPLS = ("auto", "reference", "triton")
ENV_VAR = "ANCHORFORMER_ATTN_IMPL"


def _triton_available() -> bool:
    try:
        from . import triton as _  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """Turn ``impl`` (possibly ``"auto"``) into ``"reference"`` or ``"triton"`` for ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"anchor_attention: impl must be one of {IMPLS}; got {impl!r}")
    if impl == "auto":
        env = os.environ.get(ENV_VAR, "auto") or "auto"
        if env not in IMPLS:
            raise ValueError(f"{ENV_VAR} must be one of {IMPLS}; got {env!r}")
        impl = env
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and _triton_available() else "reference"
    return impl


def anchor_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    anchors: torch.Tensor,
    *,
    normalize: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """AnchorFormer's anchor attention ``A Λ^-1 A^T v`` with ``A = softmax(qk U^T / sqrt(D))``.

    Args:
        qk: (B, H, N, D) shared query/key embedding; fp32, bf16 or fp16.
        v: (B, H, N, D) values, same dtype and device as ``qk``.
        anchors: (M, D) one set per layer (the official form), (H, M, D) per head, or
            (B, H, M, D) per image (pooled "fixed" anchors; reference implementation only).
        normalize: apply Λ^-1 (the anchor degrees); ``False`` is the ablation without it.
        impl: ``"auto"``, ``"reference"`` or ``"triton"``.

    Returns:
        (B, H, N, D) in the dtype of ``v``.
    """
    check_inputs(qk, v, anchors)
    requested = impl
    impl = resolve_impl(impl, qk.device)
    if impl == "triton" and anchors.dim() == 4:
        # Per-image anchors exist only for the non-differentiable "fixed anchors" ablation.
        impl = "reference"
    if impl == "triton" and requested == "auto" and fused_unsupported(qk, anchors) is not None:
        impl = "reference"  # "auto" serves shapes beyond the kernels' limits (D > 128, ...) by the reference
    if impl == "reference":
        return _reference_checked(qk, v, anchors, normalize)
    try:
        from .triton import anchor_attention_triton
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ValueError(f"anchor_attention impl='triton' needs the triton package: {e}") from e

    return anchor_attention_triton(
        qk, v, anchors, normalize=normalize, deterministic=torch.are_deterministic_algorithms_enabled()
    )
