"""The report built from the real outputs of a smoke pipeline: every stage's package functions, tiny settings.

The session fixture runs what each stage's notebook runs (data, complexity, classification E1-E3
and E9 and their results, detection and its summary, segmentation and its summary, anchor maps; not bench,
whose timings the report links and never reads) with seconds-long settings into one temporary
``outputs/`` tree, then builds the report from it. The tests read the report as a reader would:
each section and table once, one DeiT reference, E5's trained and standard backbones apart, E7's
entropies beside ln N, E8's trained and counted pairs apart.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

SECTIONS = [
    "# AnchorFormer: reproduction report",
    "## Reading the numbers: intervals and verdicts",
    "## E8 · The abstract's claims, recomputed from our tables",
    "### Trained pairs (profile mini)",
    "### Counted pairs: the standard models, untrained",
    "## Environment",
    "## Data",
    "## E4 · Complexity: counted (GMACs) and measured (time, memory)",
    "### Counted: params and GMACs against the number of anchors M",
    "### Counted: GMACs against resolution",
    "### Measured: time and memory",
    "## E1–E3 · ImageNet classification",
    "### E1 · AnchorFormer vs DeiT, without and with distillation (⚗)",
    "### E2 · The number of anchors M (AnchorFormer-T)",
    "### E3 · Design ablations (AnchorFormer-T)",
    "### Reference: the DeiT paper (ImageNet-1k, 224², 300 epochs; B ↑384 at 384²)",
    "## E9 · Do the anchors learn? Initialisation, temperature, learning rate (AnchorFormer-T)",
    "## E10 · AnchorFormer among its peers (T size, the E1 recipe)",
    "## E5 · COCO detection and instance segmentation",
    "### Trained detectors (profile mini)",
    "### Comparable FLOPs: AnchorFormer vs DeiT at matched backbone GMACs",
    "### Standard backbones at 1333×800 (counted, untrained)",
    "## E6 · ADE20K semantic segmentation",
    "### Trained models (profile mini)",
    "### Standard models at 512² (counted, untrained)",
    "## E7 · What the anchors gather",
    "### Attention entropy through training (E1 runs)",
    "## Deviations from the anchors' recipes",
    *(
        f"### {entry['title']}"
        for entry in yaml.safe_load((ROOT / "anchorformer" / "configs" / "deviations.yaml").read_text()).values()
    ),
    "### Global batch of each run",
]
# the smoke detectors: T-shaped backbones of 48 channels and 2 blocks on 96x120 inputs
DET_OVERRIDES = (
    "epochs=1 lr_steps=[1] max_train_images=4 max_eval_images=2 warmup_iters=1 batch_size=2 "
    "model_sizes.tiny.embed_dim=48 model_sizes.tiny.depth=2 num_anchors=8 out_channels=16 "
    "representation_size=32 mask_head_layers=1 mask_head_channels=8 min_size=96 max_size=120 match_size=[96,120]"
).split()
CLS_OVERRIDES = [
    "img_size=32", "patch_size=8", "model_sizes.tiny={embed_dim: 32, depth: 1, num_heads: 2}", "num_anchors=4",
    "batch_size=8", "lr_batch=8", "warmup_epochs=0", "throughput_batch_size=2", "throughput_iters=1", "num_workers=0",
]  # fmt: skip
SEG_OVERRIDES = [
    "model_sizes.tiny={embed_dim: 32, depth: 1, num_heads: 2}", "num_anchors=4", "pyramid_channels=16",
    "head_channels=16", "crop_size=64", "batch_size=2", "test_crop_size=64", "test_stride=48", "test_scale=[256, 64]",
]  # fmt: skip


def _stage_data(out: Path, mini: Path) -> None:
    from anchorformer.data.stage import run_data_stage

    run_data_stage("mini", mini_dir=mini, out_dir=out / "data", workers=1)


def _stage_complexity(out: Path) -> None:
    from anchorformer.complexity import complexity_tables, write_complexity

    write_complexity(out / "complexity", complexity_tables(("tiny",), (8, 30), (224,), (224, 384, 512), 30))


def _stage_classification(out: Path, tmp: Path) -> None:
    from anchorformer.data.synthetic import make_mini_imagenet
    from anchorformer.tasks.classification.results import (
        attach_intervals,
        e1_table,
        e2_table,
        e3_table,
        e9_table,
        e10_table,
        load_runs,
        write_results,
    )
    from anchorformer.tasks.classification.train import train as train_classification

    data = tmp / "imagenet"
    make_mini_imagenet(data, seed=0, train_per_class=2, val_per_class=1, img_size=40)
    cls = out / "cls"
    for name in ("anchorformer_tiny_patch16_224", "deit_tiny_patch16_224"):
        train_classification(data, cls / "e1" / name, name, profile="mini", overrides=CLS_OVERRIDES, epochs=1)
    t = "anchorformer_tiny_patch16_224"
    train_classification(
        data, cls / "e2" / "m2", t, profile="mini", overrides=[*CLS_OVERRIDES, "num_anchors=2"], epochs=1
    )
    train_classification(
        data,
        cls / "e3" / "fixed_anchors",
        t,
        profile="mini",
        overrides=[*CLS_OVERRIDES, "anchor_mode=pooled"],
        epochs=1,
    )
    train_classification(
        data, cls / "e9" / "unit_init", t, profile="mini", overrides=[*CLS_OVERRIDES, "anchor_init=unit"], epochs=1
    )
    peer = "agent_deit_tiny_patch16_224"
    train_classification(data, cls / "e10" / peer, peer, profile="mini", overrides=CLS_OVERRIDES, epochs=1)
    train_classification(
        data, cls / "seeds" / "anchorformer_t-s1", t, profile="mini", overrides=[*CLS_OVERRIDES, "seed=1"], epochs=1
    )
    e1, e9 = load_runs([cls / "e1"]), load_runs([cls / "e9"])
    tables = {
        "e1": e1_table(e1),
        "e2": e2_table(load_runs([cls / "e2"]), baseline=e1),
        "e3": e3_table(load_runs([cls / "e3"]), baseline=e1),
        "e9": e9_table(e9, baseline=e1),
        "e10": e10_table(load_runs([cls / "e10"]), baseline=e1, e9_runs=e9),
    }
    attach_intervals(tables, load_runs([cls / "seeds"]), n_boot=200)
    write_results(cls / "results", tables)


def _stage_detection(out: Path, coco: Path) -> None:
    from anchorformer.tasks.detection.results import comparable_flops_pairs, load_runs, write_summary
    from anchorformer.tasks.detection.train import train as train_detection

    det = out / "det"
    for run, backbone, matched in (
        ("anchorformer_t", "anchorformer_tiny_patch16_224", ""),
        ("deit_t_matched", "deit_tiny_patch16_224", "anchorformer_tiny_patch16_224"),
    ):
        train_detection(coco, det / run, backbone, overrides=[f"match_macs_of={matched}", *DET_OVERRIDES])
    rows = load_runs(det, ["anchorformer_t", "deit_t_matched"])
    write_summary(det / "summary", rows, comparable_flops_pairs(rows))


def _stage_segmentation(out: Path, ade: Path) -> None:
    from anchorformer.io import write_json_atomic
    from anchorformer.tasks.segmentation.results import complexity_rows, load_runs, write_summary
    from anchorformer.tasks.segmentation.train import train as train_segmentation

    seg = out / "seg"
    for run, backbone in (
        ("anchorformer_t_fpn", "anchorformer_tiny_patch16_224"),
        ("deit_t_fpn", "deit_tiny_patch16_224"),
    ):
        train_segmentation(ade, seg / run, backbone, overrides=SEG_OVERRIDES, head="fpn", iters=1, max_eval_images=2)
    write_summary(seg / "summary", load_runs(seg, ["anchorformer_t_fpn", "deit_t_fpn"]))
    write_json_atomic(seg / "summary" / "complexity.json", complexity_rows([("anchorformer_tiny_patch16_224", "fpn")]))


def _stage_anchor_maps(out: Path) -> None:
    from anchorformer.io import write_json_atomic
    from anchorformer.models import model_from_checkpoint
    from anchorformer.viz import anchor_map_entropy, compute_anchor_maps, images_to_tensor, real_photographs

    checkpoint = out / "cls" / "e1" / "anchorformer_tiny_patch16_224" / "model.pth"
    model, meta = model_from_checkpoint(checkpoint)
    photos = real_photographs(("astronaut", "coffee"))
    img = model.patch_embed.img_size[0]
    x, _ = images_to_tensor(list(photos.values()), img, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    layers = [0]
    maps = compute_anchor_maps(model, x, layers=layers)
    entropy = anchor_map_entropy(maps, layers)
    summary = {"source": f"{meta['model_name']} from {checkpoint}", "images": list(photos), "layers": layers}
    summary |= {"entropy": entropy, "mean_entropy": {str(r["layer"]): r["mean_entropy"] for r in entropy}}
    write_json_atomic(out / "anchor_maps" / "anchor_maps.json", summary)


@pytest.fixture(scope="session")
def smoke_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A smoke pipeline's ``outputs/`` and the report built from it (profile mini)."""
    import torch

    from anchorformer.report import build_report

    tmp = tmp_path_factory.mktemp("smoke_pipeline")
    out, mini = tmp / "outputs", tmp / "mini"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _stage_data(out, mini)
        _stage_complexity(out)
        _stage_classification(out, tmp)
        _stage_detection(out, mini / "coco")
        _stage_segmentation(out, mini / "ade20k" / "ADEChallengeData2016")
        _stage_anchor_maps(out)
    finally:
        torch.set_num_threads(threads)
    result = build_report(out, tmp / "reports" / "report.md", profile="mini")
    return {"outputs": out, "result": result, "text": result["markdown"].read_text(encoding="utf-8")}


def _sections(text: str) -> dict[str, str]:
    """Each heading line with the text up to the next heading."""
    parts = re.split(r"^(#{1,3} .*)$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _tables(text: str) -> list[str]:
    return re.findall(r"(?:^\|.*\|\n)+", text, flags=re.M)


def test_each_section_and_table_once(smoke_report):
    text = smoke_report["text"]
    headings = re.findall(r"^#{1,6} .*$", text, flags=re.M)
    assert headings == SECTIONS  # the report's own headings, in order, each once; nothing pasted adds one
    sections = _sections(text)
    for title in SECTIONS:
        if title.startswith("### ") and title != "### Measured: time and memory":  # a link to the bench page
            assert len(_tables(sections[title])) == 1, f"{title}: expected one table"
    assert not _tables(sections["### Measured: time and memory"])
    tables = _tables(text)
    assert len(tables) == len(set(tables)), "a table appears twice"
    assert "Not run yet" not in text and "not recorded" not in text  # every stage's JSON was found
    assert all(smoke_report["result"]["sections"].values())


def test_one_deit_reference(smoke_report):
    from anchorformer.tasks.classification.results import DEIT_PAPER

    text = smoke_report["text"]
    assert text.count("DeiT paper") == 1
    assert text.count("| DeiT-Ti | 5M | 1.3 | 72.2 | 74.5 |") == 1
    assert len(DEIT_PAPER) == 4
    # the paper's top-1 beside our DeiT-T row is the same constant
    e1 = _sections(text)["### E1 · AnchorFormer vs DeiT, without and with distillation (⚗)"]
    assert re.search(r"^\| DeiT-T( \(mini\))? \|.*\| 72\.2 \|$", e1, flags=re.M)


def test_e5_trained_and_standard_backbones_apart(smoke_report):
    sections = _sections(smoke_report["text"])
    trained = sections["### Trained detectors (profile mini)"]
    assert "AnchorFormer-T (48 ch, 2 blocks, 3 heads, patch 8, M 8)" in trained
    assert "DeiT-T (48 ch, 2 blocks, 3 heads, patch 8)" in trained
    assert "| 96×120 |" in trained and "1333" not in trained
    summary = json.loads((smoke_report["outputs"] / "det/summary/summary.json").read_text())
    af = summary["runs"][0]
    assert af["input_size"] == "96x120" and af["input_gmacs"] < 0.1  # the trained backbone at its input
    assert f"| {af['input_gmacs']:.3f} |" in trained
    standard = sections["### Standard backbones at 1333×800 (counted, untrained)"]
    assert "AnchorFormer-T (192 ch, 12 blocks, 3 heads, patch 16, M 30)" in standard
    assert "DeiT-B (768 ch, 12 blocks, 12 heads, patch 16)" in standard
    assert standard.count("| 800×1333 |") == 9 and "48 ch" not in standard


def test_e7_entropy_beside_ln_n(smoke_report):
    e7 = _sections(smoke_report["text"])["## E7 · What the anchors gather"]
    (table,) = _tables(e7)
    assert "| uniform: ln N |" in table.splitlines()[0]
    maps = json.loads((smoke_report["outputs"] / "anchor_maps/anchor_maps.json").read_text())
    (row,) = maps["entropy"]
    assert row["tokens"] == 16  # 32² input, patch 8
    assert row["mean_entropy"] <= math.log(16) + 1e-6
    assert f"| 0 | 16 | {math.log(16):.3f} | {row['mean_entropy']:.3f} |" in table


def test_e8_trained_and_counted_pairs_apart(smoke_report):
    sections = _sections(smoke_report["text"])
    (trained,) = _tables(sections["### Trained pairs (profile mini)"])
    (counted,) = _tables(sections["### Counted pairs: the standard models, untrained"])
    assert len(trained.splitlines()) == 2 + 3  # header, rule, the three claims
    assert len(counted.splitlines()) == 2 + 1  # the FLOPs claim only
    assert "T@224² (M=30)" in counted and "@224²" not in trained
    assert "anchorformer_t vs deit_t_matched" in trained
    headline = smoke_report["result"]["headline"]
    assert [r["best_pair"] for r in headline["counted"]] == ["T@384² (M=30)"]
    assert headline["trained"][0]["pairs"] and headline["trained"][2]["pairs"]


def test_every_top1_carries_an_interval_and_every_difference_a_verdict(smoke_report):
    text = smoke_report["text"]
    sections = _sections(text)
    assert text.count("**Rule:**") == 1  # stated once
    e1 = _sections(text)["### E1 · AnchorFormer vs DeiT, without and with distillation (⚗)"]
    for line in _tables(e1)[0].splitlines()[2:]:
        assert re.search(r"\| \d+\.\d \[\d+\.\d, \d+\.\d\] \|", line), line  # top-1 [lo, hi]
    af = next(line for line in e1.splitlines() if line.startswith("| AnchorFormer-T"))
    assert "| 2: " in af  # two seeds: the E1 run and the cls-seeds run
    assert re.search(r"\[[-+]\d+\.\d, [-+]\d+\.\d\] (higher|lower|not distinguishable)", af)
    (e10,) = _tables(sections["## E10 · AnchorFormer among its peers (T size, the E1 recipe)"])
    assert "| Agent-T |" in e10 and "[" in e10
    assert "**Verdict.**" in sections["## E10 · AnchorFormer among its peers (T size, the E1 recipe)"]
    (trained,) = _tables(sections["### Trained pairs (profile mini)"])
    accuracy = trained.splitlines()[2]
    assert re.search(r"% \[[-+]\d+\.\d\d, [-+]\d+\.\d\d\] \|", accuracy), accuracy
    assert any(v in accuracy for v in ("supported", "same direction", "not distinguishable"))
