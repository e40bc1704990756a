"""The anchors through training (E9): the entropy probe, k-means anchors, the anchors' learning rate.

- :class:`EntropyProbe`: each attention layer's mean entropy of p(token | anchor) and
  p(anchor | token) (softmax attention: p(token | token)) on a fixed validation batch, the same
  images every epoch, taken by index from the validation set (no loader, no random draw), in eval
  mode without gradients: measuring changes neither the run's random streams nor its numbers.
- :func:`kmeans_anchors_from_first_batch`: ``anchor_init="kmeans"``, the anchors set from the
  first training batch's qk embeddings before the first step of a fresh run (a resumed run keeps
  its trained anchors).
- :func:`optimizer_params`: the parameter groups with the anchors' learning rate multiplied by
  ``anchor_lr_mult`` (timm's ``lr_scale``, which its schedulers apply at every update).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader, Dataset

from ...models.attention_stats import attention_entropies, attention_layers, init_anchors_kmeans, uniform_entropies

__all__ = [
    "ENTROPY_DECIMALS",
    "ENTROPY_IMAGES",
    "EntropyProbe",
    "entropy_probe",
    "entropy_names",
    "kmeans_anchors_from_first_batch",
    "optimizer_params",
]

ENTROPY_IMAGES = 32  # images of the fixed validation batch (fewer when the set is smaller)
ENTROPY_DECIMALS = 5  # entropies are rounded so that the same seed writes the same bytes


def entropy_names(kind: str, layers: int) -> list[str]:
    """The logged names of one entropy ``kind`` (e.g. ``token_given_anchor``): one per layer, then the mean."""
    return [f"entropy/{kind}/layer{i}" for i in range(layers)] + [f"entropy/{kind}/mean"]


class EntropyProbe:
    """Per-layer attention entropies of ``model`` on a fixed batch of ``dataset``.

    Args:
        model: the bare model (not compiled, not DDP-wrapped): hooks go on its modules.
        dataset: the validation set with its evaluation transform; images are taken at indices
            ``i * len(dataset) // n`` (spread over every class of a sorted ImageFolder).
        device: where the batch goes.
        n: images in the batch.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, device: torch.device, n: int = ENTROPY_IMAGES) -> None:
        size = len(dataset)  # type: ignore[arg-type]
        n = min(n, size)
        if n < 1:
            raise ValueError("EntropyProbe: the validation set is empty")
        self.model = model
        self.indices = [i * size // n for i in range(n)]
        self.images = torch.stack([dataset[i][0] for i in self.indices]).to(device)  # (n, 3, S, S)
        with torch.no_grad():
            self.num_tokens = int(model.patch_embed(self.images[:1]).shape[1]) + _prefix_tokens(model)

    def measure(self) -> dict[str, float]:
        """``entropy/<kind>/layer<i>`` and ``entropy/<kind>/mean`` in nats, rounded to
        :data:`ENTROPY_DECIMALS`; kinds ``token_given_anchor`` and ``anchor_given_token``
        (AnchorFormer) or ``token_given_token`` (softmax attention)."""
        layers = attention_entropies(self.model, self.images)
        out: dict[str, float] = {}
        for kind in layers[0]:
            values = [layer[kind] for layer in layers]
            names = entropy_names(kind, len(values))
            for name, value in zip(names, [*values, sum(values) / len(values)]):
                out[name] = round(value, ENTROPY_DECIMALS)
        return out

    def summary(self, init: dict[str, float] | None) -> dict[str, dict[str, float] | None]:
        """For ``metrics.json``: ``uniform`` (:meth:`uniform`), ``init`` (the measurement before
        training, as given) and ``final`` (now), keys without the ``entropy/`` prefix."""

        def strip(values: dict[str, float] | None) -> dict[str, float] | None:
            return None if values is None else {k.removeprefix("entropy/"): v for k, v in values.items()}

        return {"uniform": self.uniform(), "init": strip(init), "final": strip(self.measure())}

    def uniform(self) -> dict[str, float]:
        """The uniform values per kind: ln N (tokens, prefix included) and ln M, rounded."""
        return {k: round(v, ENTROPY_DECIMALS) for k, v in uniform_entropies(self.model, self.num_tokens).items()}


def entropy_probe(model: nn.Module, dataset: Dataset, device: torch.device) -> EntropyProbe | None:
    """An :class:`EntropyProbe` for a ViT with anchor or softmax attention; ``None`` for other
    models (a CNN teacher)."""
    if not hasattr(model, "patch_embed") or not attention_layers(model):
        return None
    return EntropyProbe(model, dataset, device)


def _prefix_tokens(model: nn.Module) -> int:
    return int(getattr(model, "num_prefix_tokens", 1))  # class (and distillation) tokens


def kmeans_anchors_from_first_batch(model: nn.Module, loader: DataLoader, device: torch.device, seed: int) -> int:
    """Set ``model``'s anchors to k-means centroids of the first training batch's qk embeddings.

    The batch is the loader's first (the sampler is reseeded at each epoch's start, so it is also
    the first batch of epoch 1); Python's, NumPy's and torch's random states are restored after,
    so the run goes on as it would have. Call it on a fresh run only.

    Returns:
        The number of layers initialised.
    """
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        images, _ = next(iter(loader))
        count = init_anchors_kmeans(model, images.to(device), seed=seed)
    random.setstate(py)
    np.random.set_state(npy)
    return count


def optimizer_params(model: nn.Module, weight_decay: float, anchor_lr_mult: float) -> Any:
    """What ``timm.optim.create_optimizer_v2`` takes: the model itself when ``anchor_lr_mult`` is 1
    (timm's grouping: no decay on 1-D parameters and ``no_weight_decay()``), else timm's groups with
    the anchors (and temperatures) moved from the no-decay group to a last group of their own with
    ``lr_scale = anchor_lr_mult``.

    Raises:
        ValueError: ``anchor_lr_mult`` is not > 0, or is not 1 for a model without anchors.
    """
    if not anchor_lr_mult > 0:
        raise ValueError(f"anchor_lr_mult must be a number > 0; got {anchor_lr_mult!r}")
    if anchor_lr_mult == 1:
        return model
    names = {id(p): n for n, p in model.named_parameters()}
    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=nwd)
    anchors = []
    for group in groups:
        if group["weight_decay"] == 0.0:
            keep = [p for p in group["params"] if not names[id(p)].endswith((".anchors", ".logit_scale"))]
            anchors += [p for p in group["params"] if names[id(p)].endswith((".anchors", ".logit_scale"))]
            group["params"] = keep
    if not anchors:
        raise ValueError(f"anchor_lr_mult={anchor_lr_mult}: {type(model).__name__} has no learned anchors")
    groups = [g for g in groups if g["params"]]
    groups.append({"params": anchors, "weight_decay": 0.0, "lr_scale": float(anchor_lr_mult)})
    return groups
