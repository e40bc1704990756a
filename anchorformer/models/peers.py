"""AnchorFormer's peers (experiment E10): four efficient attentions in the same DeiT backbone.

Each peer replaces every attention of timm's DeiT (pre-norm blocks, LayerNorm eps 1e-6, patch 16,
MLP ratio 4, a class token, qkv bias as DeiT) and nothing else, so that E10 compares attentions
under one recipe. Written from the papers' equations; the hyper-parameters are the official
modules' defaults:

- :class:`AgentAttention` (Han et al., "Agent Attention: On the Integration of Softmax and Linear
  Attention", ECCV 2024; official ``AgentAttention`` of ``agent_deit.py``):
  ``O = σ(Q Aᵀ + B₂) σ(A Kᵀ + B₁) V + DWC(V)``, agents ``A`` = the patch queries average-pooled
  to a √n x √n grid (n = 49 = 7 x 7), σ the softmax with DeiT's 1/√D scale, agent biases ``B₁``,
  ``B₂`` (a 7 x 7 map per head and agent resized to the token grid, plus row and column terms, plus
  one term per prefix token) and a 3 x 3 depthwise convolution of ``V`` on the patch grid.
  The row and column terms have the official length 14 (the grid of 224² images) and, like the
  7 x 7 maps, are resized (bilinear) to the current grid, so the weights fit any image size.
- :class:`NystromAttention` (Xiong et al., "Nyströmformer", AAAI 2021; official ``NysAttention``
  of ``token_nystromformer.py``): ``O = σ(Q K̃ᵀ) Z σ(Q̃ Kᵀ) V`` with ``Z ≈ pinv(σ(Q̃ K̃ᵀ))``, the
  landmarks ``Q̃``, ``K̃`` = means of L = 64 consecutive segments of the tokens (raster order,
  prefix tokens first), ``Z`` by 6 iterations of the cubic Newton-Schulz scheme
  ``Z ← ¼ Z (13 I − KZ (15 I − KZ (7 I − KZ)))`` from ``Z₀ = Kᵀ / max_j Σ_i K_ij``, in fp32.
- :class:`FocusedLinearAttention` (Han et al., "FLatten Transformer", ICCV 2023; the
  ``sr_ratio=1`` path of the official ``FocusedLinearAttention`` of ``flatten_pvt.py``):
  ``O = φ_p(Q) (φ_p(K)ᵀ V) / (φ_p(Q) Σ_n φ_p(K_n)) + DWC(V)``, with
  ``φ_p(x) = ||x'|| x'^p / ||x'^p||``, ``x' = (ReLU(x) + 1e-6) / softplus(s)`` (``s`` a learned
  per-channel scale, the norms over all C channels), p = 3, and a 5 x 5 depthwise convolution of
  ``V`` shared by the heads.
- :class:`ISABAttention` (Lee et al., "Set Transformer", ICML 2019; ``ISAB``/``MAB`` of
  ``modules.py``): learned inducing points ``I`` (M = 30, AnchorFormer's M: the "learned anchors,
  untied q/k" control); ``H = MAB(I, X) = I + σ(I K_Xᵀ) V_X``, ``H ← H + ReLU(H W_o)``; then the
  attention of ``MAB(X, H)``: ``O = σ(Q_X (H W_k)ᵀ) (H W_v)``. The second MAB's residual and
  feed-forward are the DeiT block's own (pre-norm residual and MLP), so they are not repeated.

Choices where the official code does not fit a DeiT with any prefix tokens or grid:

- Prefix tokens (class, distillation; P of them, any P >= 0): Agent pools its agents from the patch
  queries only and gives every prefix token its own learned bias row/column (the official code
  hard-codes one class token and breaks with a distillation token); the depthwise convolutions of
  Agent and FLatten run on the patch grid only, so prefix tokens get no DWC term (FLatten's DeiT
  code was never released; this is Agent's official choice, used for both). Nyström's segments
  and ISAB's attention treat prefix tokens as ordinary tokens (the official T2T code does).
- The token grid: the attention knows the patch grid ``grid_size`` (h, w) the model was built for
  (``set_input_size`` updates it), so non-square grids work (dense tasks, ``forward_intermediates``
  at other sizes); a token count that does not match P + h w is an error. Agent's bias maps are
  resized (bilinear) to the current grid; its agents are adaptive-average-pooled from any grid.
- Nyström when N is not divisible by L: the first ``L − N mod L`` segments hold ⌊N/L⌋ tokens, the
  rest one more (the official rule); with fewer tokens than landmarks, every token is its own
  landmark (L = N).
- FLatten drops the official per-layer learned positional encoding added to the keys (a PVT
  addition sized to one token count; DeiT's position embedding is already in the tokens), and
  computes φ_p and ``φ_p(K)ᵀ V`` in fp32 (x³ overflows fp16).

Letters: B batch, N tokens (P prefix + h w patches), C channels, H heads, D = C / H, n agents,
L landmarks, M inducing points.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .anchorformer import DEFAULT_NUM_ANCHORS, _cfg, _check_img_size, _is_set, _pair, checkpoint_filter_fn

__all__ = [
    "PEER_FAMILIES",
    "PEER_MODEL_NAMES",
    "PEER_TOKEN_KWARG",
    "AgentAttention",
    "FocusedLinearAttention",
    "ISABAttention",
    "NystromAttention",
    "PeerBlock",
    "PeerViT",
    "is_peer",
    "nystrom_pinv",
    "peer_family",
]


def _check_masks(attn_mask: Optional[torch.Tensor], is_causal: bool, name: str) -> None:  # noqa: UP045
    if attn_mask is not None or is_causal:
        raise ValueError(f"{name} does not support attn_mask or is_causal")


class _PeerAttention(nn.Module):
    """What every peer shares: a qkv projection (timm's layout), an output projection, the grid.

    ``grid_size`` (h, w) and ``num_prefix_tokens`` (P) are set by :class:`PeerViT`; a standalone
    module gets them as arguments.

    Args:
        dim, num_heads: C and H (C divisible by H).
        qkv_bias, proj_bias, proj_drop: as timm's ``Attention``; its other arguments (qk_norm,
            attn_drop, norm_layer, ...) are accepted and do not apply.
        grid_size, num_prefix_tokens: the token layout.
        device, dtype: of the parameters (the peers' own ones follow, :meth:`_factory`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        grid_size: tuple[int, int] | int = (14, 14),
        num_prefix_tokens: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **_: Any,  # timm's other attention arguments (qk_norm, attn_drop, norm_layer, ...) do not apply
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"{type(self).__name__}: dim={dim} must be divisible by num_heads={num_heads}")
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        h, w = _pair(grid_size)
        self.grid_h = int(h)
        self.grid_w = int(w)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.kind = type(self).__name__

    def _factory(self) -> dict[str, Any]:
        """``device`` and ``dtype`` of this module's parameters, for the ones a peer adds."""
        return dict(device=self.qkv.weight.device, dtype=self.qkv.weight.dtype)

    def _no_masks(self, attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:  # noqa: UP045
        """Refuse ``attn_mask`` and ``is_causal``, which no peer supports."""
        if torch.jit.is_scripting():
            _check_masks(attn_mask, is_causal, self.kind)
        elif _is_set(attn_mask) or _is_set(is_causal):  # FX passes proxies for both: left to the calls that run
            raise ValueError(f"{self.kind} does not support attn_mask or is_causal")

    def set_grid(self, grid_size: tuple[int, int], num_prefix_tokens: int) -> None:
        """The patch grid (h, w) and prefix-token count P of the tokens this layer will see."""
        self.grid_h, self.grid_w = (int(s) for s in grid_size)
        self.num_prefix_tokens = int(num_prefix_tokens)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, N, D) of tokens ``x`` (B, N, C), after checking N = P + h w."""
        n = self.num_prefix_tokens + self.grid_h * self.grid_w
        torch._assert(
            x.shape[1] == n,
            f"{self.kind}: expected {n} tokens ({self.num_prefix_tokens} prefix + "
            f"{self.grid_h}x{self.grid_w} patches; set_input_size changes the grid)",
        )
        qkv = self.qkv(x).reshape(-1, n, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
        return q, k, v

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) -> projected (B, N, C)."""
        n = self.num_prefix_tokens + self.grid_h * self.grid_w
        out = out.transpose(1, 2).reshape(-1, n, self.num_heads * self.head_dim)  # (B, N, C)
        return self.proj_drop(self.proj(out))

    def _patch_grid(self, t: torch.Tensor) -> torch.Tensor:
        """The patch tokens of ``t`` (B, H, N, D) as an image (B, H*D, h, w), channels head-major."""
        p = self.num_prefix_tokens
        patches = t[:, :, p:]  # (B, H, h*w, D)
        return patches.permute(0, 1, 3, 2).reshape(-1, self.num_heads * self.head_dim, self.grid_h, self.grid_w)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, grid=({self.grid_h}, {self.grid_w}), prefix={self.num_prefix_tokens}"


# ---------------------------------------------------------------------------------------------
# Agent Attention
# ---------------------------------------------------------------------------------------------

AGENT_BIAS_SIDE = 7  # the official per-agent bias maps are 7 x 7, resized to the token grid


class AgentAttention(_PeerAttention):
    """Agent Attention: ``σ(Q Aᵀ + B₂) σ(A Kᵀ + B₁) V + DWC(V)`` (module docstring).

    Args:
        dim: C.
        num_heads: H.
        num_agents: n, a square (agents pooled to √n x √n); the official 49.
        agent_bias: learn the official agent biases B₁, B₂ (False: none).
        dwc_kernel: side of the depthwise convolution of V (official 3); 0: none.
        bias_window: length of the row and column biases (official 14, the grid of 224² images),
            resized to the grid's height and width: the weights fit a model of any image size.
        qkv_bias, proj_bias, proj_drop, grid_size, num_prefix_tokens, device, dtype: as
            :class:`_PeerAttention` (the token layout is set by the model).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        num_agents: int = 49,
        agent_bias: bool = True,
        dwc_kernel: int = 3,
        bias_window: int = 14,
        **kwargs: Any,  # qkv_bias, proj_bias, proj_drop, grid_size, num_prefix_tokens, device, dtype
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        side = math.isqrt(num_agents) if isinstance(num_agents, int) and num_agents > 0 else 0
        if side * side != num_agents:
            raise ValueError(
                f"AgentAttention: num_agents must be a square (pooled to a side x side grid); got {num_agents!r}"
            )
        if dwc_kernel < 0 or (dwc_kernel and dwc_kernel % 2 == 0):
            raise ValueError(f"AgentAttention: dwc_kernel must be 0 (none) or odd; got {dwc_kernel!r}")
        dd = self._factory()
        self.num_agents = num_agents
        self.pool_side = side
        self.dwc_kernel = dwc_kernel
        self.dwc = nn.Conv2d(dim, dim, dwc_kernel, padding=dwc_kernel // 2, groups=dim, **dd) if dwc_kernel else None
        H, n, P = num_heads, num_agents, self.num_prefix_tokens
        h0 = w0 = bias_window  # the row/column biases' length (official: the 14 x 14 grid of 224²)
        if agent_bias:
            s = AGENT_BIAS_SIDE
            self.an_bias = nn.Parameter(torch.empty(H, n, s, s, **dd))  # agent -> patch map (B₁)
            self.na_bias = nn.Parameter(torch.empty(H, n, s, s, **dd))  # patch -> agent map (B₂)
            self.ah_bias = nn.Parameter(torch.empty(H, n, h0, 1, **dd))  # B₁ rows
            self.aw_bias = nn.Parameter(torch.empty(H, n, 1, w0, **dd))  # B₁ columns
            self.ha_bias = nn.Parameter(torch.empty(H, n, h0, 1, **dd))  # B₂ rows
            self.wa_bias = nn.Parameter(torch.empty(H, n, 1, w0, **dd))  # B₂ columns
            self.ac_bias = nn.Parameter(torch.empty(H, n, P, **dd))  # B₁ for each prefix token
            self.ca_bias = nn.Parameter(torch.empty(H, P, n, **dd))  # B₂ for each prefix token
        else:
            for name in ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "ac_bias", "ca_bias"):
                self.register_parameter(name, None)
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation of the biases: truncated normal, std 0.02."""
        for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            if p is not None:
                trunc_normal_(p, std=0.02)
        for p in (self.ac_bias, self.ca_bias):
            if p is not None:
                trunc_normal_(p, std=0.02)

    def set_grid(self, grid_size: tuple[int, int], num_prefix_tokens: int) -> None:
        if self.ac_bias is not None and int(num_prefix_tokens) != self.ac_bias.shape[-1]:
            raise ValueError(
                f"AgentAttention: built with biases for {self.ac_bias.shape[-1]} prefix tokens; got {num_prefix_tokens}"
            )
        super().set_grid(grid_size, num_prefix_tokens)

    def _biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """B₁ (H, n, N) and B₂ (H, N, n) on the current grid, prefix tokens first."""
        h, w = self.grid_h, self.grid_w
        an, na = self.an_bias, self.na_bias
        ah, aw, ha, wa = self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias
        ac, ca = self.ac_bias, self.ca_bias
        assert an is not None and na is not None and ah is not None and aw is not None
        assert ha is not None and wa is not None and ac is not None and ca is not None
        # each map resized to the grid (an identity for the rows and columns on a 14 x 14 grid)
        b1 = F.interpolate(an, size=(h, w), mode="bilinear", align_corners=False)  # (H, n, h, w)
        b1 = b1 + F.interpolate(ah, size=(h, 1), mode="bilinear", align_corners=False)
        b1 = b1 + F.interpolate(aw, size=(1, w), mode="bilinear", align_corners=False)
        b2 = F.interpolate(na, size=(h, w), mode="bilinear", align_corners=False)
        b2 = b2 + F.interpolate(ha, size=(h, 1), mode="bilinear", align_corners=False)
        b2 = b2 + F.interpolate(wa, size=(1, w), mode="bilinear", align_corners=False)
        b1 = torch.cat([ac, b1.flatten(2)], dim=2)  # (H, n, N)
        b2 = torch.cat([ca, b2.flatten(2).transpose(1, 2)], dim=1)  # (H, N, n)
        return b1, b2

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,  # noqa: UP045
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Args: x (B, N, C). Returns (B, N, C). ``attn_mask`` must be None, ``is_causal`` False."""
        self._no_masks(attn_mask, is_causal)
        q, k, v = self._split(x)
        H, D, s = self.num_heads, self.head_dim, self.pool_side
        pooled = F.adaptive_avg_pool2d(self._patch_grid(q), (s, s))  # (B, C, s, s)
        agents = pooled.reshape(-1, H, D, s * s).transpose(-1, -2)  # (B, H, n, D)
        logits1 = (agents * self.scale) @ k.transpose(-1, -2)  # (B, H, n, N)
        logits2 = (q * self.scale) @ agents.transpose(-1, -2)  # (B, H, N, n)
        if self.an_bias is not None:
            b1, b2 = self._biases()
            logits1 = logits1 + b1.to(logits1.dtype)
            logits2 = logits2 + b2.to(logits2.dtype)
        agent_v = logits1.softmax(dim=-1) @ v  # (B, H, n, D)
        out = logits2.softmax(dim=-1) @ agent_v  # (B, H, N, D)
        if self.dwc is not None:
            p = self.num_prefix_tokens
            local = self.dwc(self._patch_grid(v))  # (B, C, h, w)
            local = local.reshape(-1, H, D, self.grid_h * self.grid_w).transpose(-1, -2)  # (B, H, h*w, D)
            out = torch.cat([out[:, :, :p], out[:, :, p:] + local], dim=2)  # prefix tokens: no DWC term
        return self._merge(out)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, agents={self.num_agents}, bias={self.an_bias is not None}, dwc={self.dwc_kernel}"
        )


# ---------------------------------------------------------------------------------------------
# Nyströmformer
# ---------------------------------------------------------------------------------------------


def _newton_schulz(k: torch.Tensor, iterations: int) -> torch.Tensor:
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    # Z₀ = Kᵀ / ||K||₁ (the largest column sum; K's rows sum to 1 after the softmax)
    z = k.transpose(-1, -2) / k.sum(dim=-2).amax(dim=-1)[..., None, None]
    for _ in range(iterations):
        kz = k @ z
        z = (0.25 * z) @ (13 * eye - kz @ (15 * eye - kz @ (7 * eye - kz)))
    return z


@torch.jit.unused
def _newton_schulz_fp32(k: torch.Tensor, iterations: int) -> torch.Tensor:
    """:func:`_newton_schulz` in fp32 with autocast off (eager, FX and export; not TorchScript)."""
    kind = k.device.type
    if kind in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(kind):
        with torch.autocast(device_type=kind, enabled=False):
            return _newton_schulz(k.float(), iterations)
    return _newton_schulz(k.float(), iterations)


def nystrom_pinv(k: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Nyströmformer's iterative Moore-Penrose pseudo-inverse, in fp32 whatever the input dtype.

    Args:
        k: (..., L, L), rows of a softmax (non-negative, summing to 1).
        iterations: Newton-Schulz steps (official 6); each costs 4 L³ MACs per matrix.

    Returns:
        (..., L, L) float32.
    """
    if torch.jit.is_scripting():
        return _newton_schulz(k.float(), iterations)
    return _newton_schulz_fp32(k, iterations)


torch.fx.wrap("nystrom_pinv")  # one opaque node for FX: its autocast check needs the real device


def segment_bounds(n: int, landmarks: int) -> list[tuple[int, int]]:
    """The [start, end) of each landmark's segment of ``n`` tokens: the first ``L − n mod L``
    segments hold ``n // L`` tokens, the rest one more (L = min(landmarks, n))."""
    L = min(landmarks, n)
    s, r = divmod(n, L)
    sizes = [s] * (L - r) + [s + 1] * r
    starts = [sum(sizes[:i]) for i in range(L)]
    return [(a, a + z) for a, z in zip(starts, sizes)]


class NystromAttention(_PeerAttention):
    """Nyström attention: ``σ(Q K̃ᵀ) pinv(σ(Q̃ K̃ᵀ)) σ(Q̃ Kᵀ) V`` (module docstring).

    Args:
        dim: C.
        num_heads: H.
        num_landmarks: L (official 64); clamped to N when there are fewer tokens.
        pinv_iterations: Newton-Schulz steps of the pseudo-inverse (official 6).
        qkv_bias, proj_bias, proj_drop, grid_size, num_prefix_tokens, device, dtype: as
            :class:`_PeerAttention` (the token layout is set by the model).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        num_landmarks: int = 64,
        pinv_iterations: int = 6,
        **kwargs: Any,  # qkv_bias, proj_bias, proj_drop, grid_size, num_prefix_tokens, device, dtype
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if isinstance(num_landmarks, bool) or not isinstance(num_landmarks, int) or num_landmarks < 1:
            raise ValueError(f"NystromAttention: num_landmarks must be an integer >= 1; got {num_landmarks!r}")
        if isinstance(pinv_iterations, bool) or not isinstance(pinv_iterations, int) or pinv_iterations < 0:
            raise ValueError(f"NystromAttention: pinv_iterations must be an integer >= 0; got {pinv_iterations!r}")
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations

    def _landmarks(self, t: torch.Tensor) -> torch.Tensor:
        """Segment means (B, H, L, D) of ``t`` (B, H, N, D), N in raster order, prefix first."""
        n = self.num_prefix_tokens + self.grid_h * self.grid_w
        L = min(self.num_landmarks, n)
        s = n // L
        short = L - (n - s * L)  # segments of s tokens; the remaining L - short have s + 1
        H, D = self.num_heads, self.head_dim
        first = t[:, :, : short * s].reshape(-1, H, short, s, D).mean(dim=3)  # (B, H, short, D)
        if short == L:
            return first
        rest = t[:, :, short * s :].reshape(-1, H, L - short, s + 1, D).mean(dim=3)  # (B, H, L - short, D)
        return torch.cat([first, rest], dim=2)  # (B, H, L, D)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,  # noqa: UP045
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Args: x (B, N, C). Returns (B, N, C). ``attn_mask`` must be None, ``is_causal`` False."""
        self._no_masks(attn_mask, is_causal)
        q, k, v = self._split(x)
        q = q * self.scale
        q_l, k_l = self._landmarks(q), self._landmarks(k)  # (B, H, L, D)
        kernel1 = (q @ k_l.transpose(-1, -2)).softmax(dim=-1)  # (B, H, N, L)
        kernel2 = (q_l @ k_l.transpose(-1, -2)).softmax(dim=-1)  # (B, H, L, L)
        kernel3 = (q_l @ k.transpose(-1, -2)).softmax(dim=-1)  # (B, H, L, N)
        z = nystrom_pinv(kernel2, self.pinv_iterations).to(v.dtype)  # (B, H, L, L)
        out = (kernel1 @ z) @ (kernel3 @ v)  # (B, H, N, D)
        return self._merge(out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, landmarks={self.num_landmarks}, pinv_iterations={self.pinv_iterations}"


# ---------------------------------------------------------------------------------------------
# FLatten: focused linear attention
# ---------------------------------------------------------------------------------------------


def focus(x: torch.Tensor, scale: torch.Tensor, p: float) -> torch.Tensor:
    """FLatten's focused map φ_p on the channels of ``x`` (B, N, C), fp32.

    ``x' = (ReLU(x) + 1e-6) / softplus(scale)``, ``φ_p(x) = ||x'|| x'^p / ||x'^p||``.
    """
    x = (F.relu(x.float()) + 1e-6) / F.softplus(scale.float())
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    xp = x**p
    return xp / torch.linalg.vector_norm(xp, dim=-1, keepdim=True) * norm


class FocusedLinearAttention(_PeerAttention):
    """FLatten's focused linear attention (module docstring).

    Args:
        dim: C.
        num_heads: H.
        focusing_factor: p (official 3).
        dwc_kernel: side of the depthwise convolution of V, shared by the heads (official 5); 0: none.
        qkv_bias, proj_bias, proj_drop, grid_size, num_prefix_tokens, device, dtype: as
            :class:`_PeerAttention` (the token layout is set by the model).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        focusing_factor: float = 3.0,
        dwc_kernel: int = 5,
        **kwargs: Any,  # qkv_bias, proj_bias, proj_drop, grid_size, num_prefix_tokens, device, dtype
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if not focusing_factor > 0:
            raise ValueError(f"FocusedLinearAttention: focusing_factor must be > 0; got {focusing_factor!r}")
        if dwc_kernel < 0 or (dwc_kernel and dwc_kernel % 2 == 0):
            raise ValueError(f"FocusedLinearAttention: dwc_kernel must be 0 (none) or odd; got {dwc_kernel!r}")
        dd = self._factory()
        self.focusing_factor = float(focusing_factor)
        self.dwc_kernel = dwc_kernel
        D = self.head_dim
        self.dwc = nn.Conv2d(D, D, dwc_kernel, padding=dwc_kernel // 2, groups=D, **dd) if dwc_kernel else None
        self.focus_scale = nn.Parameter(torch.zeros(dim, **dd))  # s: softplus(0) = ln 2 at the start
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.zeros_(self.focus_scale)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,  # noqa: UP045
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Args: x (B, N, C). Returns (B, N, C). ``attn_mask`` must be None, ``is_causal`` False."""
        self._no_masks(attn_mask, is_causal)
        q, k, v = self._split(x)
        H, D = self.num_heads, self.head_dim
        n = self.num_prefix_tokens + self.grid_h * self.grid_w
        # φ_p over all C channels (the official norms are over C, not per head), in fp32
        q32 = focus(q.transpose(1, 2).reshape(-1, n, H * D), self.focus_scale, self.focusing_factor)
        k32 = focus(k.transpose(1, 2).reshape(-1, n, H * D), self.focus_scale, self.focusing_factor)
        q32 = q32.reshape(-1, n, H, D).transpose(1, 2)  # (B, H, N, D)
        k32 = k32.reshape(-1, n, H, D).transpose(1, 2)  # (B, H, N, D)
        z = 1.0 / (q32 @ k32.mean(dim=2, keepdim=True).transpose(-1, -2) + 1e-6)  # (B, H, N, 1)
        kv = (k32.transpose(-1, -2) * n**-0.5) @ (v.float() * n**-0.5)  # (B, H, D, D)
        out = ((q32 @ kv) * z).to(v.dtype)  # (B, H, N, D)
        if self.dwc is not None:
            p = self.num_prefix_tokens
            grid = v[:, :, p:].transpose(-1, -2).reshape(-1, D, self.grid_h, self.grid_w)  # (B*H, D, h, w)
            local = self.dwc(grid).reshape(-1, H, D, self.grid_h * self.grid_w).transpose(-1, -2)  # (B, H, h*w, D)
            out = torch.cat([out[:, :, :p], out[:, :, p:] + local], dim=2)  # prefix tokens: no DWC term
        return self._merge(out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.focusing_factor}, dwc={self.dwc_kernel}"


# ---------------------------------------------------------------------------------------------
# Set Transformer: induced set attention
# ---------------------------------------------------------------------------------------------


class ISABAttention(_PeerAttention):
    """Induced set attention (module docstring): ``H = MAB(I, X)``, ``O = attention of MAB(X, H)``.

    Args:
        dim: C.
        num_heads: H.
        num_inducing: M learned inducing points (default AnchorFormer's M, 30).
        qkv_bias, proj_bias, proj_drop, grid_size, num_prefix_tokens, device, dtype: as
            :class:`_PeerAttention` (the token layout is set by the model; ISAB needs no grid).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        num_inducing: int = DEFAULT_NUM_ANCHORS,
        **kwargs: Any,  # qkv_bias, proj_bias, proj_drop, grid_size, num_prefix_tokens, device, dtype
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if isinstance(num_inducing, bool) or not isinstance(num_inducing, int) or num_inducing < 1:
            raise ValueError(f"ISABAttention: num_inducing must be an integer >= 1; got {num_inducing!r}")
        dd = self._factory()
        self.num_inducing = num_inducing
        self.inducing = nn.Parameter(torch.empty(num_inducing, dim, **dd))  # I (M, C)
        self.fc_o = nn.Linear(dim, dim, **dd)  # the first MAB's feed-forward H + ReLU(H W_o)
        self.kv_h = nn.Linear(dim, 2 * dim, bias=self.qkv.bias is not None, **dd)  # keys and values of H
        self.init_weights()

    def init_weights(self) -> None:
        """The inducing points as the official ``nn.init.xavier_uniform_`` of a (1, M, C) tensor."""
        bound = math.sqrt(6.0 / (self.num_inducing + self.inducing.shape[1]))
        nn.init.uniform_(self.inducing, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,  # noqa: UP045
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Args: x (B, N, C). Returns (B, N, C). ``attn_mask`` must be None, ``is_causal`` False."""
        self._no_masks(attn_mask, is_causal)
        q, k, v = self._split(x)
        H, D, M = self.num_heads, self.head_dim, self.num_inducing
        ind = self.inducing.to(q.dtype).reshape(1, M, H, D).transpose(1, 2)  # (1, H, M, D)
        ind = ind.expand(q.shape[0], -1, -1, -1)  # (B, H, M, D)
        h = ind + F.scaled_dot_product_attention(ind, k, v)  # (B, H, M, D)
        h = h.transpose(1, 2).reshape(-1, M, H * D)  # (B, M, C)
        h = h + F.relu(self.fc_o(h))
        kv = self.kv_h(h).reshape(-1, M, 2, H, D).permute(2, 0, 3, 1, 4)  # (2, B, H, M, D)
        k_h, v_h = kv.unbind(0)
        out = F.scaled_dot_product_attention(q, k_h, v_h)  # (B, H, N, D)
        return self._merge(out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, inducing={self.num_inducing}"


# ---------------------------------------------------------------------------------------------
# Block and backbone
# ---------------------------------------------------------------------------------------------

ATTENTIONS: dict[str, type[_PeerAttention]] = {
    "agent": AgentAttention,
    "nystrom": NystromAttention,
    "flatten": FocusedLinearAttention,
    "isab": ISABAttention,
}
PEER_FAMILIES = tuple(ATTENTIONS)
# The creation argument holding each peer's number of summary tokens (None: it has none). The
# recipes' ``num_anchors`` (M) sets it (anchorformer.models.factory.backbone_kwargs), so a mini
# run compares every method at the same M.
PEER_TOKEN_KWARG: dict[str, str | None] = {
    "agent": "num_agents",
    "nystrom": "num_landmarks",
    "flatten": None,
    "isab": "num_inducing",
}
# each family's own creation arguments (the ones the official code has, and M)
PEER_KWARGS: dict[str, tuple[str, ...]] = {
    "agent": ("num_agents", "agent_bias", "dwc_kernel", "bias_window"),
    "nystrom": ("num_landmarks", "pinv_iterations"),
    "flatten": ("focusing_factor", "dwc_kernel"),
    "isab": ("num_inducing",),
}
LABELS = {"agent": "Agent", "nystrom": "Nyström", "flatten": "FLatten", "isab": "ISAB"}


class PeerBlock(nn.Module):
    """Pre-norm block ``x + DropPath(attn(LN(x)))``, ``x + DropPath(MLP(LN(x)))`` with a peer
    attention; module names as timm's ``Block``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        mlp_layer: type[nn.Module] = Mlp,
        family: str = "agent",
        attn_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **_: Any,  # timm passes qk_norm, attn_drop, attn_layer, depth, ...: not used here
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = ATTENTIONS[family](
            dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, proj_drop=proj_drop,
            **(attn_kwargs or {}), **dd,
        )  # fmt: skip
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd
        )
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,  # noqa: UP045
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class PeerViT(VisionTransformer):
    """timm's DeiT with every attention a peer's (``family``: agent, nystrom, flatten, isab).

    ``set_input_size`` also tells every attention its new grid.
    """

    def __init__(self, family: str = "agent", **kwargs: Any) -> None:
        if family not in ATTENTIONS:
            raise ValueError(f"unknown peer family {family!r}; expected one of {PEER_FAMILIES}")
        attn = {k: kwargs.pop(k) for k in PEER_KWARGS[family] if k in kwargs}
        _check_img_size(kwargs.get("img_size", 224), kwargs.get("patch_size", 16))
        if kwargs.get("dynamic_img_size"):
            raise ValueError(f"{family} attention needs the token grid: dynamic_img_size is not supported")
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        grid = tuple(s // p for s, p in zip(_pair(kwargs.get("img_size", 224)), _pair(kwargs.get("patch_size", 16))))
        prefix = (1 if kwargs.get("class_token", True) else 0) + int(kwargs.get("reg_tokens", 0) or 0)
        attn.update(grid_size=grid, num_prefix_tokens=prefix)
        kwargs["block_fn"] = partial(PeerBlock, family=family, attn_kwargs=attn)
        super().__init__(**kwargs)
        self.family = family
        self._set_grid()

    def _set_grid(self) -> None:
        for m in self.modules():
            if isinstance(m, _PeerAttention):
                m.set_grid(self.patch_embed.grid_size, self.num_prefix_tokens)

    def set_input_size(self, img_size: Any = None, patch_size: Any = None) -> None:
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self._set_grid()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embeddings, tokens, and the peers' biases, scales and inducing points."""
        names = {"pos_embed", "cls_token"}
        ends = ("_bias", ".focus_scale", ".inducing")
        names |= {n for n, _ in self.named_parameters() if n.endswith(ends) and ".attn." in n and "qkv" not in n}
        return names


# ---------------------------------------------------------------------------------------------
# Registered variants
# ---------------------------------------------------------------------------------------------

_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
}
PEER_MODEL_NAMES: list[str] = [f"{family}_deit_{size}_patch16_224" for family in PEER_FAMILIES for size in _SIZES]

default_cfgs = generate_default_cfgs({name: _cfg(224) for name in PEER_MODEL_NAMES})


def peer_family(name: str) -> str | None:
    """The peer family of a model name (``agent_deit_tiny_patch16_224`` -> ``agent``), else None."""
    family = name.split("_deit_", 1)[0] if "_deit_" in name else None
    return family if family in ATTENTIONS else None


def is_peer(name: str) -> bool:
    """Whether ``name`` is one of the registered peer models."""
    return name in PEER_MODEL_NAMES


def _create(variant: str, pretrained: bool, family: str, **kwargs: Any) -> nn.Module:
    """timm's ``build_model_with_cfg`` as for AnchorFormer (``pretrained=True`` loads the config's
    ``file`` through :func:`checkpoint_filter_fn`)."""
    out_indices = kwargs.pop("out_indices", 3)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    overlay.setdefault("input_size", (kwargs.get("in_chans", 3), *_pair(kwargs.get("img_size", 224))))
    return build_model_with_cfg(
        PeerViT,
        variant,
        pretrained,
        family=family,
        pretrained_cfg=kwargs.pop("pretrained_cfg", None),
        pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _register(name: str, family: str, size: str) -> None:
    def fn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        model_args = dict(patch_size=16, img_size=224, **_SIZES[size])
        return _create(name, pretrained, family, **dict(model_args, **kwargs))

    fn.__name__ = name
    fn.__qualname__ = name
    fn.__module__ = __name__
    fn.__doc__ = f"DeiT-{size[0].upper()} with {LABELS[family]} attention (patch 16, 224x224, {_SIZES[size]})."
    register_model(fn)
    globals()[name] = fn


for _family in PEER_FAMILIES:
    for _size in _SIZES:
        _register(f"{_family}_deit_{_size}_patch16_224", _family, _size)
