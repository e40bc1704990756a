"""The exact inference form of anchor attention: the projections folded into the anchors.

In :class:`~anchorformer.models.anchorformer.AnchorAttention` the shared query/key embedding
``qk`` is only ever multiplied by the anchors, and the values only pass through the linear maps
A^T, Λ^-1, A and the output projection. Both fold, per head h (W_qk,h and W_v,h the head's (D, C)
rows of ``in_proj``, W_o,h the (C, D) columns of ``proj``, U_h the (M, D) anchors):

    logits_h = qk_h U_h^T / sqrt(D) = x K_h + c_h,  K_h = W_qk,h^T U_h^T / sqrt(D)  (C, M)
    y        = sum_h A_h Λ_h^-1 (A_h^T v_h) W_o,h^T + b_o
             = sum_h A_h [Λ_h^-1 (A_h^T x) G_h + (Λ_h^-1 deg_h) e_h] + b_o,
               G_h = W_v,h^T W_o,h^T  (C, C),  e_h = W_o,h b_v,h  (C,)

with c_h = b_qk,h U_h^T / sqrt(D) the logits' bias when ``in_proj`` has one, and a learned
temperature exp(s) folded into K_h and c_h. ``Λ^-1 deg`` is 1 for every anchor whose degree is
above the floor (0 below it, the operator's 1/0 -> 0 rule); without normalisation Λ^-1 is left out
and the factor is ``deg``. The degrees run over all N tokens, class and distillation tokens
included, as in the operator. In exact arithmetic the outputs equal the unfused layer's.

Per image and layer the attention sublayer then costs 3 N C (H M) + (H M) C^2 MACs instead of
3 N C^2 + 3 N M C: the C x C projections become C x HM ones, and the one C x C product per head
runs on the M anchors' mean inputs instead of the N tokens. The folded weights take H C^2 + H M C
numbers instead of 3 C^2 + H M D; for AnchorFormer-T (C 192, H 3, M 30) the sublayer takes 46%
fewer MACs at 224² and 59% fewer at 1024². The fold pays once N exceeds about
H M C / (2 (C + M - H M)) tokens for the value path (T: 66, S: 150, B: 316); ViT-B at 224² (198
tokens) counts 3% more MACs fused.

Pooled anchors (the "fixed anchors" ablation) are computed from each image's ``qk``: they do not
fold into weights, and :class:`FusedAnchorAttention` refuses them. A fused layer is for
inference only: it holds no parameters, and switching it to training mode raises.

Letters used in shapes: B batch, N tokens, C channels, H heads, D = C / H head dim, M anchors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn

from ..ops.anchor_attention.reference import accumulation_dtype, inverse_degree

__all__ = ["FusedAnchorAttention", "fuse_anchor_attention", "is_fused"]


class FusedAnchorAttention(nn.Module):
    """An :class:`~anchorformer.models.AnchorAttention` ``attn`` with its projections folded into the anchors (eval only).

    Buffers (the model's dtype and device; folded in float64 from the layer's weights):
    ``logit_weight`` (H*M, C), ``logit_bias`` (H*M,) or None, ``value_out`` (H, C, C),
    ``anchor_bias`` (H, C) or None, ``proj_bias`` (C,) or None.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        if attn.anchors is None:
            raise ValueError(
                f"fuse_for_inference: anchor_mode={attn.anchor_mode!r} computes its anchors from each image's qk; "
                "only learned anchors fold into the projections"
            )
        H, D, M = attn.num_heads, attn.head_dim, attn.num_anchors
        C = H * D
        self.num_heads, self.head_dim, self.num_anchors, self.normalize = H, D, M, attn.normalize
        dd = dict(device=attn.in_proj.weight.device, dtype=attn.in_proj.weight.dtype)
        f64 = torch.float64
        with torch.no_grad():
            w_in = attn.in_proj.weight.to(f64)  # (2C, C): [W_qk; W_v]
            w_qk, w_v = w_in[:C].reshape(H, D, C), w_in[C:].reshape(H, D, C)
            b_in = attn.in_proj.bias.to(f64) if attn.in_proj.bias is not None else None
            u = attn.anchors.to(f64)
            u = u.expand(H, M, D) if u.dim() == 2 else u  # (H, M, D)
            scale = D**-0.5
            if attn.logit_scale is not None:
                scale = scale * attn.logit_scale.to(f64).exp()
            u = u * scale
            w_out = attn.proj.weight.to(f64).reshape(C, H, D)  # (C_out, H, D)
            logit_weight = torch.einsum("hmd,hdc->hmc", u, w_qk).reshape(H * M, C)  # (HM, C)
            value_out = torch.einsum("hdc,ohd->hco", w_v, w_out)  # (H, C_in, C_out): W_v,h^T W_o,h^T
            logit_bias = anchor_bias = None
            if b_in is not None:
                b_qk, b_v = b_in[:C].reshape(H, D), b_in[C:].reshape(H, D)
                logit_bias = torch.einsum("hmd,hd->hm", u, b_qk).reshape(H * M)  # (HM,)
                anchor_bias = torch.einsum("hd,ohd->ho", b_v, w_out)  # (H, C_out)
        self.register_buffer("logit_weight", logit_weight.to(**dd))
        self.register_buffer("logit_bias", None if logit_bias is None else logit_bias.to(**dd))
        self.register_buffer("value_out", value_out.to(**dd))
        self.register_buffer("anchor_bias", None if anchor_bias is None else anchor_bias.to(**dd))
        proj_bias = attn.proj.bias
        self.register_buffer("proj_bias", None if proj_bias is None else proj_bias.detach().clone())
        self.train(False)

    def train(self, mode: bool = True) -> FusedAnchorAttention:
        """Eval mode only: a fused layer has no parameters to train (``mode=True`` raises)."""
        if mode:
            raise RuntimeError(
                "FusedAnchorAttention is for inference only (model.fuse_for_inference() folded the projections); "
                "train the unfused model and fuse a copy"
            )
        return super().train(False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Args: x (B, N, C). Returns (B, N, C) in the dtype of the last product (x's, or autocast's)."""
        if _is_set(attn_mask) or _is_set(is_causal):  # as AnchorAttention: FX proxies stand for any value
            raise ValueError("FusedAnchorAttention does not support attn_mask or is_causal")
        B, N, C = x.shape
        H, M = self.num_heads, self.num_anchors
        acc = accumulation_dtype(x.dtype)
        logits = nn.functional.linear(x, self.logit_weight, self.logit_bias)  # (B, N, HM)
        a = logits.to(acc).reshape(B, N, H, M).softmax(dim=-1).reshape(B, N, H * M)  # p(m | n) per head
        deg = a.sum(dim=1)  # (B, HM), over all tokens
        ax = torch.bmm(a.transpose(1, 2), x.to(acc))  # (B, HM, C): sum_n p(m|n) x_n
        weight = deg
        if self.normalize:
            inv = inverse_degree(deg)  # (B, HM), 1/0 -> 0
            ax = ax * inv[..., None]  # the anchors' mean inputs
            weight = deg * inv  # 1 above the degree floor, 0 below
        z = torch.matmul(ax.reshape(B, H, M, C), self.value_out.to(acc))  # (B, H, M, C): mean values, projected
        if self.anchor_bias is not None:  # the value bias, weighted by Λ^-1 deg
            z = z + weight.reshape(B, H, M, 1) * self.anchor_bias.to(acc)[None, :, None, :]
        y = torch.bmm(a, z.reshape(B, H * M, C))  # (B, N, C): sum over heads and anchors
        if self.proj_bias is not None:
            y = y + self.proj_bias
        if y.dtype != x.dtype and not torch.is_autocast_enabled():
            y = y.to(x.dtype)  # a 16-bit model outside autocast: accumulated in fp32, returned in its dtype
        return y

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, anchors={self.num_anchors}, normalize={self.normalize}, fused=True"


def _is_set(arg: Any) -> bool:
    return not isinstance(arg, torch.fx.Proxy) and arg is not None and arg is not False


def fuse_anchor_attention(attn: nn.Module) -> FusedAnchorAttention:
    """The folded, eval-only equivalent of ``attn`` (see the module docstring)."""
    return FusedAnchorAttention(attn)


def is_fused(model: Any) -> bool:
    """Whether ``model`` holds fused anchor-attention layers."""
    return isinstance(model, nn.Module) and any(isinstance(m, FusedAnchorAttention) for m in model.modules())
