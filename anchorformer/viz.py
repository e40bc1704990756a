"""Figures shared by the notebooks (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator  # noqa: E402

__all__ = [
    "anchor_map_entropy",
    "compute_anchor_maps",
    "plot_ap_vs_gmacs",
    "plot_detections",
    "images_to_tensor",
    "plot_anchor_maps",
    "plot_gmacs_vs_resolution",
    "plot_segmentation",
    "real_photographs",
    "save_figure",
    "SavedFigure",
]


# Saved figures are byte-identical for the same figure: no date in SVG, a fixed salt for SVG ids,
# no software version in PNG (matplotlib writes no time into PNG).
SAVE_DPI = 150
_SVG_SALT = "anchorformer"
_METADATA = {"svg": {"Date": None, "Creator": None}, "png": {"Software": None}}


class SavedFigure(list):
    """The paths :func:`save_figure` wrote; shown in a notebook as the figure (its PNG, else SVG)."""

    dpi: float = 150.0

    def _file(self, suffix: str) -> Path | None:
        return next((p for p in self if p.suffix == suffix and p.is_file()), None)

    def _repr_png_(self) -> tuple[bytes, dict[str, int]] | None:
        path = self._file(".png")
        if path is None:
            return None
        data = path.read_bytes()
        width = int.from_bytes(data[16:20], "big")  # the PNG header (IHDR): width, height
        return data, {"width": round(width * 96 / self.dpi)}  # the size the figure was drawn at

    def _repr_svg_(self) -> str | None:
        if self._file(".png") is not None:
            return None  # one image per figure in the notebook
        path = self._file(".svg")
        return None if path is None else path.read_text(encoding="utf-8")


def save_figure(
    fig: Any, path: str | Path, formats: Sequence[str] = ("png", "svg"), dpi: float = SAVE_DPI
) -> SavedFigure:
    """Save ``fig`` as ``path`` with each suffix in ``formats`` (the folder is created); close it.

    The files are deterministic (no dates, fixed SVG ids). The returned list of paths shows as the
    figure when it is a notebook cell's value (``display(save_figure(...))`` elsewhere in a cell).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = SavedFigure()
    written.dpi = dpi
    with plt.rc_context({"svg.hashsalt": _SVG_SALT}):
        for fmt in formats:
            p = path.with_suffix("." + fmt)
            fig.savefig(p, dpi=dpi, bbox_inches="tight", metadata=_METADATA.get(fmt))
            written.append(p)
    plt.close(fig)
    return written


def plot_gmacs_vs_resolution(resolution_rows: list[dict[str, Any]], title: str = "GMACs vs resolution") -> Any:
    """Log-scale GMACs of DeiT and AnchorFormer against the image side, one colour per size.

    Args:
        resolution_rows: the ``resolution`` table of :func:`anchorformer.complexity.complexity_tables`.

    Returns:
        The matplotlib figure.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted({r["size"] for r in resolution_rows}, key="TSB".index)
    for i, size in enumerate(sizes):
        rows = sorted((r for r in resolution_rows if r["size"] == size), key=lambda r: r["img_size"])
        x = [r["img_size"] for r in rows]
        color = f"C{i}"
        ax.plot(x, [r["deit_gmacs"] for r in rows], "s--", color=color, label=f"DeiT-{size}")
        ax.plot(
            x,
            [r["anchorformer_gmacs"] for r in rows],
            "o-",
            color=color,
            label=f"AnchorFormer-{size} (M={rows[0]['num_anchors']})",
        )
    ax.set_xscale("log", base=2)
    sides = sorted({r["img_size"] for r in resolution_rows})
    ax.set_xticks(sides, [str(s) for s in sides])  # the sides themselves, not powers of two
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yscale("log")
    ax.set_xlabel("image side (pixels)")
    ax.set_ylabel("GMACs")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# E7: what the anchors gather, p(token | anchor) over the image
# ---------------------------------------------------------------------------------------------


def real_photographs(names: Sequence[str] = ("astronaut", "coffee", "chelsea")) -> dict[str, Any]:
    """Photographs shipped with scikit-image (``skimage.data``), as HxWx3 uint8 arrays."""
    import skimage.data

    photos = {}
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"skimage.data has no image named {name!r}")
        img = loader()
        if img.ndim == 2:
            img = img[..., None].repeat(3, axis=-1)
        photos[name] = img[..., :3]
    return photos


def images_to_tensor(images: Sequence[Any], img_size: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    """Centre-crop each HxWx3 uint8 image to a square, resize to ``img_size`` and normalise.

    Returns:
        (B, 3, img_size, img_size) float tensor and the list of the cropped, resized uint8 images.
    """
    import numpy as np
    import torch
    from PIL import Image

    tensors, shown = [], []
    for img in images:
        h, w = img.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        crop = Image.fromarray(np.ascontiguousarray(img[top : top + s, left : left + s])).resize(
            (img_size, img_size), Image.BICUBIC
        )
        arr = np.array(crop)
        shown.append(arr)
        t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
        t = (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        tensors.append(t)
    return torch.stack(tensors), shown


def compute_anchor_maps(model: Any, images: Any, layers: Sequence[int] | None = None) -> dict[int, Any]:
    """p(token | anchor) over the patch grid, for each requested layer of an AnchorFormer.

    The operator gives p(anchor | token) = softmax over anchors (rows of A). With a uniform prior
    over tokens, Bayes gives p(token | anchor) = A[token, anchor] / deg[anchor]: the column of A
    normalised by the anchor's degree, i.e. where the anchor gathers its value from.

    Args:
        model: an AnchorFormer (plain or distilled), any ``anchor_mode``.
        images: (B, 3, H, W) normalised images at the model's input size.
        layers: block indices (default: all).

    Returns:
        ``{layer: (B, M, gh, gw)}`` float tensors, averaged over heads, restricted to the patch
        tokens (they sum to at most 1 over the grid: the prefix tokens take the rest), and the
        anchors' degrees under the key ``("degree", layer)`` as (B, M).
    """
    import torch

    from .models.anchorformer import AnchorAttention
    from .ops.anchor_attention import anchor_probabilities

    blocks = list(model.blocks)
    layers = list(range(len(blocks))) if layers is None else list(layers)
    for i in layers:
        if not 0 <= i < len(blocks) or not isinstance(blocks[i].attn, AnchorAttention):
            raise ValueError(f"layer {i} is not an anchor-attention block of this model ({len(blocks)} blocks)")
    captured: dict[int, Any] = {}
    hooks = [
        blocks[i].attn.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0].detach()))
        for i in layers
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images)
            grid = model.patch_embed.grid_size
            n_prefix = int(getattr(model, "num_prefix_tokens", 1))
            out: dict[Any, Any] = {}
            for i in layers:
                qk, _, anchors = blocks[i].attn.embed(captured[i])  # from the block's normalised input
                B = qk.shape[0]
                a = anchor_probabilities(qk, anchors)  # (B, H, N, M)
                deg = a.sum(dim=2, keepdim=True)  # (B, H, 1, M)
                p_token = torch.where(deg > 0, a / deg.clamp_min(1e-30), torch.zeros_like(a))
                p_patch = p_token[:, :, n_prefix:].mean(dim=1)  # (B, N - prefix, M)
                out[i] = p_patch.transpose(1, 2).reshape(B, -1, *grid)  # (B, M, gh, gw)
                out[("degree", i)] = deg.mean(dim=1)[:, 0]  # (B, M)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return out


def anchor_map_entropy(maps: dict[Any, Any], layers: Sequence[int]) -> list[dict[str, Any]]:
    """How concentrated each anchor's gathering is: the entropy of p(token | anchor), per layer.

    The entropy is taken over the N patch tokens (nats) for every image and anchor; a uniform
    gathering over the patches has entropy ln N, one patch 0. (The prefix tokens' small share of
    each anchor is left out, as in the maps.)

    Args:
        maps: :func:`compute_anchor_maps`.
        layers: the layers to summarise (keys of ``maps``).

    Returns:
        One row per layer: ``layer``, ``tokens`` (N), ``uniform_entropy`` (ln N), and the
        ``mean_entropy``, ``min_entropy`` and ``max_entropy`` over images and anchors.
    """
    import math

    rows = []
    for i in layers:
        p = maps[i].flatten(2)  # (B, M, N)
        h = -(p * p.clamp_min(1e-12).log()).sum(-1)  # (B, M)
        n = p.shape[-1]
        rows.append(
            {
                "layer": int(i),
                "tokens": int(n),
                "uniform_entropy": math.log(n),
                "mean_entropy": float(h.mean()),
                "min_entropy": float(h.min()),
                "max_entropy": float(h.max()),
            }
        )
    return rows


def plot_anchor_maps(
    shown: Sequence[Any],
    maps: dict[Any, Any],
    layers: Sequence[int],
    num_anchors: int = 4,
    titles: Sequence[str] | None = None,
) -> Any:
    """Heat maps of p(token | anchor) over each image: rows = (image, layer), columns = anchors.

    The anchors shown per row are the ``num_anchors`` of largest degree for that image and layer.
    """
    import numpy as np

    rows = [(b, layer) for b in range(len(shown)) for layer in layers]
    cell = 1.0  # inches per panel: 18 rows of 5 panels are 550 x 2,000 pixels at 110 dpi (notebook 40)
    fig, axes = plt.subplots(
        len(rows), num_anchors + 1, figsize=(cell * (num_anchors + 1), cell * len(rows) + 0.4), layout="constrained"
    )
    axes = np.atleast_2d(axes)
    for r, (b, layer) in enumerate(rows):
        img = shown[b]
        axes[r, 0].imshow(img)
        name = titles[b] if titles else f"image {b}"
        axes[r, 0].set_title(f"{name}\nlayer {layer}", fontsize=7)
        deg = maps[("degree", layer)][b]
        top = deg.argsort(descending=True)[:num_anchors].tolist()
        for c, m in enumerate(top, start=1):
            heat = maps[layer][b, m].cpu().numpy()
            axes[r, c].imshow(img)
            axes[r, c].imshow(
                heat,
                cmap="inferno",
                alpha=0.6,
                extent=(0, img.shape[1], img.shape[0], 0),
                interpolation="bilinear",
            )
            axes[r, c].set_title(f"anchor {m}\n(deg {float(deg[m]):.1f})", fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("p(token | anchor): where each anchor gathers from", fontsize=9)  # above the rows (constrained)
    return fig


def plot_detections(
    images: Sequence[Any],
    predictions: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    *,
    score_thresh: float = 0.5,
    mask_thresh: float = 0.5,
    cols: int = 4,
    titles: Sequence[str] | None = None,
) -> Any:
    """Predicted boxes and masks over images, one colour per category, with scores.

    Args:
        images: (3, H, W) tensors in [0, 1].
        predictions: per image ``boxes`` (K, 4) xyxy, ``labels`` (K,) in 1..len(class_names),
            ``scores`` (K,), optionally ``masks`` (K, 1, H, W) probabilities.
        class_names: name of label ``i + 1`` at index ``i``.
        score_thresh: detections below are not drawn.
        mask_thresh: masks are drawn where the probability exceeds it.
        cols: images per row.
        titles: one title per image.

    Returns:
        The matplotlib figure.
    """
    import numpy as np
    from matplotlib.patches import Rectangle

    n = len(images)
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.8 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, image, pred) in enumerate(zip(axes.flat, images, predictions)):
        rgb = image.permute(1, 2, 0).float().clamp(0, 1).numpy().copy()
        keep = (pred["scores"] >= score_thresh).nonzero().flatten().tolist()
        for k in keep:
            if "masks" in pred:
                m = pred["masks"][k, 0].numpy() > mask_thresh
                rgb[m] = 0.45 * rgb[m] + 0.55 * np.array(colours(int(pred["labels"][k]) % 10)[:3])
        ax.imshow(rgb)
        for k in keep:
            label = int(pred["labels"][k])
            x0, y0, x1, y1 = pred["boxes"][k].tolist()
            c = colours(label % 10)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.2, ec=c))
            ax.text(x0, y0, f"{class_names[label - 1]} {float(pred['scores'][k]):.2f}", fontsize=6, va="bottom",
                    color="white", bbox={"facecolor": c, "pad": 1, "lw": 0})  # fmt: skip
        ax.set_title(titles[i] if titles else f"{len(keep)} detections >= {score_thresh}", fontsize=7)
    fig.tight_layout()
    return fig


def plot_ap_vs_gmacs(
    rows: Sequence[dict[str, Any]],
    metric: str = "bbox_AP",
    title: str | None = None,
    gmacs_key: str = "input_gmacs",
    xlabel: str = "backbone GMACs at the run's input (min_size x max_size x scale)",
) -> Any:
    """AP against backbone GMACs, AnchorFormer and DeiT runs.

    Args:
        rows: dicts with ``run``, ``backbone``, ``gmacs_key`` and ``metric`` (the rows of
            :func:`anchorformer.tasks.detection.results.load_runs`).
        metric: the AP key to plot.
        title: figure title.
        gmacs_key: the GMACs plotted; the default is the backbone as trained, at its input.
        xlabel: what those GMACs are.

    Returns:
        The matplotlib figure.
    """
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        anchor = str(r["backbone"]).startswith("anchor")
        x = r[gmacs_key]
        ax.plot(x, r[metric], "o" if anchor else "s", color="C0" if anchor else "C1", ms=8)
        ax.annotate(str(r["run"]), (x, r[metric]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.plot([], [], "o", color="C0", label="AnchorFormer")
    ax.plot([], [], "s", color="C1", label="DeiT")
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.12)  # room for the run names written right of the points
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.14, 0.2, 10: not 1.4×10⁻¹
    lo, hi = ax.get_xlim()
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain if hi < 10 * lo else NullFormatter())  # minor labels within a decade
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title or f"{metric} vs backbone GMACs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def segmentation_palette(num_classes: int = 150, seed: int = 0) -> Any:
    """(K + 1, 3) float RGB colours: index 0 (ADE20K "other") black, classes 1..K distinct and fixed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0  # golden-ratio steps: neighbours differ
    sat = rng.uniform(0.55, 0.95, num_classes)
    val = rng.uniform(0.6, 1.0, num_classes)
    from matplotlib.colors import hsv_to_rgb

    colours = hsv_to_rgb(np.stack([hues, sat, val], axis=1))
    return np.concatenate([np.zeros((1, 3)), colours], axis=0)


def plot_segmentation(
    images: Sequence[Any],
    ground_truths: Sequence[Any],
    predictions: Sequence[Any],
    class_names: Sequence[str],
    *,
    titles: Sequence[str] | None = None,
    alpha: float = 0.0,
) -> Any:
    """Rows of image | ground truth | prediction label maps, with a legend of the classes shown.

    Args:
        images: (H, W, 3) uint8 arrays.
        ground_truths: (H, W) label maps in ADE20K file values (0 = other / unlabelled, 1..K).
        predictions: (H, W) label maps, same values (1..K).
        class_names: K names; value k is ``class_names[k - 1]``.
        titles: one title per row (e.g. the file name).
        alpha: > 0 blends the label colours over the image with this weight of the image.

    Returns:
        The matplotlib figure.
    """
    import numpy as np
    from matplotlib.patches import Patch

    palette = segmentation_palette(len(class_names))
    n = len(images)
    present = {int(v) for lab in (*ground_truths, *predictions) for v in np.unique(np.asarray(lab)) if v > 0}
    legend_h = 0.25 * -(-(len(present) + 1) // 5) + 0.1  # inches: rows of 5 entries
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.3 * n + legend_h), squeeze=False)
    shown: set[int] = set()
    for r, (img, gt, pred) in enumerate(zip(images, ground_truths, predictions)):
        img = np.asarray(img)
        for c, (lab, what) in enumerate(((gt, "ground truth"), (pred, "prediction")), start=1):
            lab = np.asarray(lab).astype(np.int64)
            shown.update(int(v) for v in np.unique(lab) if v > 0)
            rgb = palette[np.clip(lab, 0, len(class_names))]
            if alpha > 0:
                rgb = alpha * img / 255.0 + (1 - alpha) * rgb
            axes[r, c].imshow(rgb, interpolation="nearest")
            axes[r, c].set_title(what, fontsize=7)
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(titles[r] if titles else "image", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    handles = [Patch(color=palette[0], label="other (ignored)")]
    handles += [Patch(color=palette[k], label=class_names[k - 1]) for k in sorted(shown)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_h / fig.get_figheight(), 1, 1))
    return fig
