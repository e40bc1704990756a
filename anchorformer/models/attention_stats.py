"""What the attention of a trained or fresh model does: entropies, and anchors from data (E9).

AnchorFormer's attention is the Markov chain token -> anchor -> token (REFERENCE §2): per layer,
A = softmax(qk U^T / sqrt(D)) (B, H, N, M) holds p(anchor | token) in its rows, and its columns
normalised by the degree, A[:, :, n, m] / sum_n A[:, :, n, m], are p(token | anchor). Their
entropies, averaged over images, heads and rows, say how selective the anchors are: ln M and ln N
are the uniform values (no selection), 0 a single anchor or token. For softmax attention (timm's
``Attention``, the DeiT baselines) the same is p(token | token), uniform at ln N.

:func:`init_anchors_kmeans` replaces each layer's anchors by k-means centroids of the qk
embeddings that layer sees for a batch of images (``anchor_init="kmeans"``), layer by layer in
one forward pass, so that each layer's embeddings follow from the earlier layers' new anchors.

Letters: B images, H heads, N tokens, D head dim, M anchors, P points.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention

from .anchorformer import AnchorAttention

__all__ = [
    "anchor_entropies",
    "attention_entropies",
    "attention_layers",
    "init_anchors_kmeans",
    "kmeans",
    "softmax_entropy",
    "uniform_entropies",
]


def _forward_with_pre_hooks(model: nn.Module, images: torch.Tensor, hooks: list[Any], layers: list[nn.Module]) -> None:
    """One forward pass of ``model`` in eval mode with ``hooks[i]`` a forward pre-hook of
    ``layers[i]``; the hooks are removed and the mode restored after, also on an error."""
    handles = [m.register_forward_pre_hook(h) for h, m in zip(hooks, layers)]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` in forward order: anchor attention or timm's softmax
    ``Attention`` (a model with neither gives an empty list)."""
    return [m for m in model.modules() if isinstance(m, (AnchorAttention, Attention))]


def anchor_entropies(qk: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean entropies (nats) of p(token | anchor) and p(anchor | token) of one anchor layer.

    Args:
        qk: (B, H, N, D) token embeddings.
        anchors: (M, D), (H, M, D) or (B, H, M, D), as the operator takes them.

    Returns:
        Two fp64 scalars: the entropy of p(token | anchor) averaged over images, heads and anchors
        (uniform: ln N) and of p(anchor | token) averaged over images, heads and tokens (uniform: ln M).
    """
    D = qk.shape[-1]
    logits = qk.double() @ anchors.double().transpose(-1, -2) * D**-0.5  # (B, H, N, M)
    log_a = F.log_softmax(logits, dim=-1)  # log p(anchor | token)
    h_anchor = -(log_a.exp() * log_a).sum(dim=-1).mean()
    log_t = log_a - torch.logsumexp(log_a, dim=-2, keepdim=True)  # log p(token | anchor): columns / degree
    h_token = -(log_t.exp() * log_t).sum(dim=-2).mean()
    return h_token, h_anchor


def softmax_entropy(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean entropy (nats) of softmax(q k^T * scale) over its rows: p(token | token).

    Args:
        q, k: (B, H, N, D).

    Returns:
        An fp64 scalar, averaged over images, heads and query tokens (uniform: ln N).
    """
    log_p = F.log_softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)  # (B, H, N, N)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


def _layer_entropies(module: nn.Module, x: torch.Tensor) -> dict[str, float]:
    if isinstance(module, AnchorAttention):
        qk, _, anchors = module.embed(x)
        h_token, h_anchor = anchor_entropies(qk, anchors)
        return {"token_given_anchor": float(h_token), "anchor_given_token": float(h_anchor)}
    B, N, _ = x.shape
    qkv = module.qkv(x).reshape(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)  # (B, H, N, D) each
    q, k = module.q_norm(q), module.k_norm(k)
    return {"token_given_token": float(softmax_entropy(q, k, module.scale))}


@torch.no_grad()
def attention_entropies(model: nn.Module, images: torch.Tensor) -> list[dict[str, float]]:
    """Each attention layer's mean entropies for ``images``, in eval mode, without gradients.

    The model runs one forward pass with hooks that read each attention layer's input; its mode is
    restored after, its weights and every random state are untouched (eval mode draws nothing).

    Args:
        model: a model with :class:`AnchorAttention` or timm ``Attention`` layers.
        images: (B, 3, S, S) on the model's device.

    Returns:
        One dict per layer in forward order: ``token_given_anchor`` and ``anchor_given_token``
        (AnchorFormer) or ``token_given_token`` (softmax attention), in nats.

    Raises:
        ValueError: ``model`` has no attention layer of either kind.
    """
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no AnchorAttention or timm Attention layer to measure")
    results: list[dict[str, float] | None] = [None] * len(layers)

    def hook(index: int) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            results[index] = _layer_entropies(module, args[0])

        return fn

    _forward_with_pre_hooks(model, images, [hook(i) for i in range(len(layers))], layers)
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"attention layers {missing} did not run in the forward pass")
    return results  # type: ignore[return-value]


def uniform_entropies(model: nn.Module, num_tokens: int) -> dict[str, float]:
    """The entropies of uniform attention: ln N for p(token | ·), ln M for p(anchor | token).

    Args:
        num_tokens: N, patches plus prefix tokens.
    """
    layers = attention_layers(model)
    out: dict[str, float] = {}
    if any(isinstance(m, AnchorAttention) for m in layers):
        out["token_given_anchor"] = math.log(num_tokens)
        out["anchor_given_token"] = math.log(next(m for m in layers if isinstance(m, AnchorAttention)).num_anchors)
    if any(isinstance(m, Attention) for m in layers):
        out["token_given_token"] = math.log(num_tokens)
    return out


# ---------------------------------------------------------------------------------------------
# Anchors from data
# ---------------------------------------------------------------------------------------------


def kmeans(points: torch.Tensor, k: int, *, seed: int, iters: int = 25) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding, deterministic for a seed (its own generator: the
    global random state is not used).

    Args:
        points: (P, D), P >= k.
        k: number of centroids.
        seed: seeds the k-means++ draws.
        iters: Lloyd iterations (fewer when the assignment stops changing).

    Returns:
        (k, D) centroids in ``points``' dtype; a cluster that empties keeps its previous centroid.

    Raises:
        ValueError: fewer points than centroids.
    """
    if points.dim() != 2 or points.shape[0] < k:
        raise ValueError(f"kmeans: expected points of shape (P, D) with P >= k={k}; got {tuple(points.shape)}")
    x = points.double().cpu()
    g = torch.Generator().manual_seed(int(seed))
    first = int(torch.randint(x.shape[0], (1,), generator=g))
    centroids = [x[first]]
    d2 = (x - x[first]).pow(2).sum(dim=1)  # (P,) squared distance to the nearest chosen centroid
    for _ in range(1, k):
        weights = d2 if float(d2.sum()) > 0 else torch.ones_like(d2)
        nxt = int(torch.multinomial(weights, 1, generator=g))
        centroids.append(x[nxt])
        d2 = torch.minimum(d2, (x - x[nxt]).pow(2).sum(dim=1))
    c = torch.stack(centroids)  # (k, D)
    assign = None
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(dim=1)  # (P,)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(c).index_add_(0, assign, x)  # (k, D)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)  # (k,)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
    return c.to(points.dtype)


@torch.no_grad()
def init_anchors_kmeans(model: nn.Module, images: torch.Tensor, *, seed: int, iters: int = 25) -> int:
    """Set every learned anchor set of ``model`` to k-means centroids of its layer's qk (E9).

    One forward pass in eval mode: before each anchor layer runs, its qk embeddings of ``images``
    (all images, tokens and heads pooled; per head with ``per_head_anchors``) are clustered into M
    centroids (layer i seeded with ``seed + i``), which become its anchors; the layer then runs with
    them, so later layers see the new anchors' outputs. The mode is restored after.

    Args:
        images: (B, 3, S, S) on the model's device.

    Returns:
        The number of layers initialised.

    Raises:
        ValueError: ``model`` has no learned anchors.
    """
    layers = [m for m in model.modules() if isinstance(m, AnchorAttention) and m.anchors is not None]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no learned anchors to initialise by k-means")

    def hook(index: int) -> Any:
        def fn(module: AnchorAttention, args: tuple[Any, ...]) -> None:
            qk, _, _ = module.embed(args[0])  # (B, H, N, D)
            M, D = module.num_anchors, module.head_dim
            scale = module.logit_scale.exp() if module.logit_scale is not None else 1.0  # anchors * scale meet qk
            if module.per_head_anchors:
                heads = qk.transpose(0, 1).reshape(module.num_heads, -1, D)  # (H, B*N, D)
                c = torch.stack([kmeans(h, M, seed=seed + index, iters=iters) for h in heads])  # (H, M, D)
            else:
                c = kmeans(qk.reshape(-1, D), M, seed=seed + index, iters=iters)  # (M, D)
            module.anchors.copy_((c / scale).to(module.anchors))

        return fn

    _forward_with_pre_hooks(model, images, [hook(i) for i in range(len(layers))], layers)
    return len(layers)
