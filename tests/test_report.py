"""The headline check recomputes the abstract's claims in their own form."""

from __future__ import annotations

import json

import pytest

from anchorformer.report import collect_metrics, headline_checks, write_report
from anchorformer.tables import markdown_table


def test_headline_checks_forms_and_verdicts():
    cls_pairs = [
        {"pair": "T", "top1_anchor": 60.0, "top1_deit": 50.0, "gmacs_anchor": 1.0, "gmacs_deit": 1.25},
        {"pair": "S", "top1_anchor": 70.0, "top1_deit": 70.0, "gmacs_anchor": 4.0, "gmacs_deit": 4.6},
    ]
    det_pairs = [{"pair": "T vs DeiT-T@small", "ap_anchor": 10.0, "ap_deit": 8.0, "gmacs_anchor": 50, "gmacs_deit": 52}]
    acc, flops, mp = headline_checks(cls_pairs, det_pairs)
    assert acc["ours"] == pytest.approx(20.0) and acc["best_pair"] == "T" and acc["verdict"] == "supported"
    assert flops["ours"] == pytest.approx(20.0) and flops["verdict"] == "same direction, smaller"
    assert dict(flops["pairs"])["S"] == pytest.approx(100 * (1 - 4.0 / 4.6), abs=0.01)
    assert mp["ours"] == pytest.approx(25.0) and mp["verdict"] == "same direction, smaller"


def test_headline_checks_without_results_say_not_measured():
    acc, flops, mp = headline_checks([], [])
    assert acc["ours"] is None and acc["verdict"] == "not measured"
    worse = headline_checks([{"pair": "T", "top1_anchor": 40.0, "top1_deit": 50.0, "gmacs_anchor": 2, "gmacs_deit": 1}])
    assert worse[0]["verdict"] == "not supported" and worse[1]["verdict"] == "not supported"


def test_collect_metrics_and_report_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "metrics.json").write_text(json.dumps({"top1": 55.5}))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.json").write_text(json.dumps({"top1": 44.0, "top5": 90.0}))
    rows = collect_metrics(tmp_path)
    assert [r["run"] for r in rows] == ["a/b", "c"]
    md = markdown_table(rows, ["run", "top1", "top5"])
    assert "| a/b | 55.50 | — |" in md
    paths = write_report(tmp_path / "out" / "report.md", "# Title\n\n" + md)
    assert "<table>" in paths["html"].read_text()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{")
    with pytest.raises(ValueError, match="bad/metrics.json"):
        collect_metrics(tmp_path)


def test_build_report_from_stage_outputs(tmp_path):
    """A small outputs tree in the stages' formats: tables rendered from JSON, headline split, figures."""
    from anchorformer.report import build_report

    out = tmp_path / "outputs"
    (out / "cls/results").mkdir(parents=True)
    e1 = [
        {"family": "AnchorFormer", "size": "T", "distilled": False, "top1": 66.0, "gmacs": 0.8, "label": "AF-T"},
        {"family": "DeiT", "size": "T", "distilled": False, "top1": 60.0, "gmacs": 1.0, "label": "DeiT-T"},
        {"family": "AnchorFormer", "size": "T", "distilled": True, "top1": 70.0, "gmacs": 0.8, "label": "AF-T"},
    ]
    (out / "cls/results/classification.json").write_text(json.dumps({"e1": e1, "e2": [], "e3": []}))
    (out / "cls/results/classification.md").write_text("| pasted E1 table |\n")  # never pasted
    (out / "det/summary").mkdir(parents=True)
    pairs = [
        {
            "anchorformer_run": "a",
            "deit_run": "d",
            "anchorformer_bbox_AP": 30.0,
            "deit_bbox_AP": 15.0,
            "anchorformer_gmacs": 10.0,
            "deit_gmacs": 10.5,
            "deit_input_scale": 0.5,
        }
    ]
    (out / "det/summary/summary.json").write_text(
        json.dumps({"runs": [{"run": "a", "backbone": "anchorformer_tiny_patch16_224"}], "comparable_flops": pairs})
    )
    (out / "det/a").mkdir()
    from PIL import Image

    Image.new("RGB", (1600, 400), (200, 10, 10)).save(out / "det/a/predictions.png")  # wider than the report's
    (out / "det/a/predictions.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    result = build_report(out, tmp_path / "reports" / "report.md", profile="mini")
    trained = result["headline"]["trained"]
    acc, flops, mp = trained
    assert acc["ours"] == pytest.approx(10.0) and acc["verdict"] == "supported"  # (66 - 60) / 60
    assert flops["ours"] == pytest.approx(20.0)
    assert mp["ours"] == pytest.approx(100.0) and mp["best_pair"] == "a vs d"
    assert result["headline"]["counted"][0]["verdict"] == "not measured"
    # the counted standard models join the FLOPs claim in their own table, never the trained one
    (out / "complexity").mkdir()
    rows = [
        {"size": "T", "img_size": 384, "num_anchors": 30, "anchorformer_gmacs": 3.0, "deit_gmacs": 4.5},
        {"size": "T", "img_size": 1024, "num_anchors": 30, "anchorformer_gmacs": 20.0, "deit_gmacs": 100.0},
    ]
    (out / "complexity/complexity.json").write_text(json.dumps({"models": [], "resolution": rows}))
    headline = build_report(out, tmp_path / "reports" / "report.md", profile="mini")["headline"]
    (counted,) = headline["counted"]
    assert counted["ours"] == pytest.approx(100 / 3, abs=0.01) and counted["best_pair"].startswith("T@384²")
    assert headline["trained"][1]["ours"] == pytest.approx(20.0)
    text = result["markdown"].read_text()
    assert "pasted E1 table" not in text and "| AF-T |" in text and "not public" in text
    assert "[![" in text and "(figures/det__a__predictions.png)](figures/det__a__predictions.svg)" in text
    copied = tmp_path / "reports/figures/det__a__predictions.png"
    with Image.open(copied) as im:
        assert im.size == (1000, 250)  # scaled to be read on a repository page, the aspect kept
    assert (tmp_path / "reports/figures/det__a__predictions.svg").is_file()
    assert result["metrics"] == tmp_path / "reports/headline.json"
    assert "_Not run yet: `dvc repro seg-summary`._" in text
    assert "AnchorFormer-T (mini shape)" in text  # a summary without backbone labels: named as trained
    assert result["sections"]["cls-results"] and not result["sections"]["seg-summary"]


def test_report_never_reads_params_yaml(tmp_path, monkeypatch):
    """The profile is an argument: a params.yaml in the working directory changes nothing."""
    from anchorformer.report import build_report

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("profile: full\n")
    text = build_report(tmp_path / "outputs", tmp_path / "r.md", profile="mini")["markdown"].read_text()
    assert "**Profile: mini.**" in text and "Profile: full" not in text
    text = build_report(tmp_path / "outputs", tmp_path / "r.md")["markdown"].read_text()
    assert "**Profile: not given**" in text


def test_report_e9_section_and_entropy_curves(tmp_path):
    """E9 from classification.json: its table and verdict computed from the rows; absent, 'Not run yet'."""
    from anchorformer.report import build_report

    out = tmp_path / "outputs"
    (out / "cls/results").mkdir(parents=True)
    base = {"size": "T", "distilled": False, "gmacs": 0.03, "uniform_token": 4.17439, "entropy_token_init": 4.1743}
    e1 = [
        {**base, "family": "AnchorFormer", "label": "AnchorFormer-T (mini)", "top1": 89.5, "entropy_token": 3.727,
         "entropy_anchor_init": 2.772, "entropy_anchor": 2.151, "uniform_anchor": 2.77259},
        {**base, "family": "DeiT", "label": "DeiT-T (mini)", "top1": 97.5, "entropy_token": 2.5},
    ]  # fmt: skip
    (out / "cls/results/classification.json").write_text(json.dumps({"e1": e1, "e2": [], "e3": []}))
    text = build_report(out, tmp_path / "r1" / "report.md", profile="mini")["markdown"].read_text()
    assert "_Not run yet: `dvc repro cls-e9`._" in text
    assert "| DeiT-T (mini) |  | p(token \\| token) | 4.174 | 2.500 | 4.174 | — | — | — |" in text  # E7's entropy table
    e9 = [
        {**e1[1], "variant": "DeiT-T (softmax attention, E1)", "role": "reference", "gap_to_deit": 0.0},
        {**e1[0], "variant": "official anchors (E1)", "role": "official", "gap_to_deit": -8.0},
        {**e1[0], "variant": "unit-norm anchors", "role": "ablation", "top1": 91.0, "gap_to_deit": -6.5},
    ]
    (out / "cls/results/classification.json").write_text(json.dumps({"e1": e1, "e2": [], "e3": [], "e9": e9}))
    text = build_report(out, tmp_path / "r2" / "report.md", profile="mini")["markdown"].read_text()
    assert "dvc repro cls-e9" not in text
    assert "No variant closes the gap to DeiT-T: the best, unit-norm anchors, reaches 91.0%" in text
    assert "| unit-norm anchors | 91.0 | 1 | — | — |" in text and "keeps the official initialisation" in text


def test_report_holds_no_timings_and_no_machine(tmp_path):
    """The benchmark's figures and the machine stay out of the report: it links the bench page instead.

    A bench.json with a device name and timings in the outputs changes nothing; two builds give the
    same bytes.
    """
    import platform

    from anchorformer.report import build_report, environment_info

    out = tmp_path / "outputs"
    (out / "bench").mkdir(parents=True)
    bench = {
        "environment": {"device": "cpu (ExoticCPU-9000, 1 threads)", "device_type": "cpu"},
        "models": [{"family": "DeiT", "size": "T", "img_size": 224, "mode": "infer", "median_ms": 1364.0}],
        "targets": [{"target": "AnchorFormer-T inference speed-up", "measured": 45.467, "threshold": 1.0}],
    }
    (out / "bench/bench.json").write_text(json.dumps(bench))
    first = build_report(out, tmp_path / "reports" / "report.md", profile="mini")
    text = first["markdown"].read_bytes()
    again = build_report(out, tmp_path / "reports" / "report.md", profile="mini")
    assert again["markdown"].read_bytes() == text
    text = text.decode()
    assert "ExoticCPU-9000" not in text and "1364" not in text and "45.467" not in text
    assert "bench" not in first["sections"]  # the report reads nothing of the bench stage
    assert "[../outputs/bench/bench.md](../outputs/bench/bench.md)" in text
    measured = text.split("### Measured: time and memory\n", 1)[1].split("\n## ", 1)[0]
    assert "../outputs/bench/bench.md" in measured and "rewrites that page" in measured and "|" not in measured
    assert set(environment_info()) == {"python", "torch", "timm", "triton", "anchorformer"}
    environment = text.split("## Environment\n", 1)[1].split("\n## ", 1)[0]
    for machine in {platform.platform(), platform.node(), platform.processor()} - {""}:
        assert machine not in environment


def test_batch_rows_read_the_pipelines_runs_only(tmp_path):
    """The global-batch table lists the runs under outputs/{cls,det,seg}: not a notebook's smoke run
    elsewhere under outputs/, not dvclive's copy of a summary, not a run's earlier training."""
    from anchorformer.report import batch_rows

    m = {"global_batch": 32, "recipe_global_batch": 32, "world_size": 1, "accum_steps": 1, "per_device_batch": 32}
    for rel in (
        "cls/e1/a",
        "cls/e1/a/dvclive",
        "cls/e1/a/previous-20260101-000000",
        "det/b",
        "det_smoke/c",
        "smoke/d",
        "seg/e",
    ):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "metrics.json").write_text(json.dumps(m))
    rows = batch_rows(tmp_path)
    assert [r["run"] for r in rows] == ["cls/e1/a", "det/b", "seg/e"]
    assert all(r["matches"] == "yes" for r in rows)
