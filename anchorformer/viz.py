"""Figures shared by the notebooks (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_gmacs_vs_resolution", "save_figure"]


def save_figure(fig: Any, path: str | Path, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Save ``fig`` as ``path`` with each suffix in ``formats`` (the folder is created); close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        p = path.with_suffix("." + fmt)
        fig.savefig(p, dpi=150, bbox_inches="tight")
        written.append(p)
    plt.close(fig)
    return written


def plot_gmacs_vs_resolution(resolution_rows: list[dict[str, Any]], title: str = "GMACs vs resolution") -> Any:
    """Log-scale GMACs of DeiT and AnchorFormer against the image side, one colour per size.

    Args:
        resolution_rows: the ``resolution`` table of :func:`anchorformer.complexity_cli.complexity_tables`.

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
    ax.set_yscale("log")
    ax.set_xlabel("image side (pixels)")
    ax.set_ylabel("GMACs")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
