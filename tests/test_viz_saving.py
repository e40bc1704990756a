"""Saved figures: byte-identical for the same figure, shown inline in notebooks, readable axes."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from anchorformer.viz import SavedFigure, plot_ap_vs_gmacs, plot_gmacs_vs_resolution, save_figure


def _figure():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [3, 1, 2], label="a")
    ax.fill_between([1, 2, 3], [0, 1, 0], alpha=0.3)  # clip paths and ids in SVG
    ax.legend()
    return fig


def test_the_same_figure_gives_the_same_bytes(tmp_path):
    a = save_figure(_figure(), tmp_path / "a" / "f")
    b = save_figure(_figure(), tmp_path / "b" / "f")
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    svg = a[1].read_text()
    assert "<dc:date>" not in svg and "Matplotlib v" not in svg
    assert b"Software" not in a[0].read_bytes()[:200]


def test_saved_figure_shows_as_its_png(tmp_path):
    saved = save_figure(_figure(), tmp_path / "f", dpi=100)
    assert isinstance(saved, SavedFigure) and [p.suffix for p in saved] == [".png", ".svg"]
    data, meta = saved._repr_png_()
    assert data == saved[0].read_bytes() and data[:4] == b"\x89PNG"
    assert 0 < meta["width"] < 400 and saved._repr_svg_() is None
    only_svg = save_figure(_figure(), tmp_path / "g", formats=("svg",))
    assert only_svg._repr_png_() is None and only_svg._repr_svg_().lstrip().startswith("<?xml")


def test_resolution_ticks_are_the_image_sides():
    rows = [
        {"size": "T", "img_size": s, "num_anchors": 30, "deit_gmacs": s / 100, "anchorformer_gmacs": s / 200}
        for s in (224, 384, 512, 768, 1024)
    ]
    fig = plot_gmacs_vs_resolution(rows)
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    plt.close(fig)
    assert labels == ["224", "384", "512", "768", "1024"]


@pytest.mark.parametrize("gmacs", [(0.14, 0.142, 0.227), (7.4, 100.7, 221.9)])
def test_ap_vs_gmacs_keeps_labels_inside_and_ticks_plain(gmacs):
    rows = [
        {"run": f"run_{i}", "backbone": b, "input_gmacs": g, "bbox_AP": ap}
        for i, (b, g, ap) in enumerate(zip(["anchorformer_t", "deit_t", "deit_t"], gmacs, [84.5, 83.7, 86.2]))
    ]
    fig = plot_ap_vs_gmacs(rows)
    fig.canvas.draw()
    ax = fig.axes[0]
    box = ax.get_window_extent()
    for text in ax.texts:
        assert box.contains(*text.get_window_extent().p1), text.get_text()  # the run names stay in the axes
    labels = [t.get_text() for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True) if t.get_text()]
    plt.close(fig)
    assert labels and not any("10^" in s or "times" in s for s in labels), labels


def test_anchor_maps_figure_is_small_and_its_title_above_the_rows(tmp_path):
    import numpy as np
    import torch

    from anchorformer.viz import plot_anchor_maps

    g = torch.Generator().manual_seed(0)
    shown = [np.full((64, 64, 3), 0.5, dtype=np.float32) for _ in range(6)]
    maps = {}
    for layer in (0, 1, 3):
        maps[layer] = torch.rand(6, 8, 8, 8, generator=g)
        maps[("degree", layer)] = torch.rand(6, 8, generator=g)
    fig = plot_anchor_maps(shown, maps, [0, 1, 3], 4, [f"image {i}" for i in range(6)])
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent()
    top_row = max(ax.title.get_window_extent().y1 for ax in fig.axes)
    assert title.y0 >= top_row, (title, top_row)
    png = save_figure(fig, tmp_path / "maps", dpi=110)[0].read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width <= 700 and height <= 2200, (width, height)


@pytest.mark.parametrize("n, text", [(1, "(1 problem)"), (2, "(2 problems)")])
def test_verification_counts_problems_in_the_singular_and_plural(n, text):
    from anchorformer.data.verify import VerificationError

    assert text in str(VerificationError("coco", "/x", [f"p{i}" for i in range(n)]))
