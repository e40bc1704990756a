"""The cross-machine record and the E8 verdicts a machine's arithmetic can flip (report, E8)."""

from __future__ import annotations

import pytest

from anchorformer import cross_host
from anchorformer.report import CLAIMS, _verdict

ENTRIES = [
    {"when": "a", "machines": ["A", "B"], "path": "native", "values": {"E8 mAP gain": [2.38, 0.36], "x": [1.0, 1.5]}},
    {"when": "b", "machines": ["A", "C"], "path": "native", "values": {"E8 mAP gain": [1.0, 1.5]}},
    {"when": "c", "machines": ["A", "A as AVX2"], "path": "avx2", "values": {}, "note": "same bytes"},
]


def test_committed_record_keeps_the_first_cross_machine_figures():
    entries = cross_host.load_record()
    first = entries[0]
    assert first["path"] == "native" and first["values"]["E8 mAP gain"] == [2.38, 0.36]
    assert first["values"]["det AnchorFormer-T box AP"] == [83.2, 84.0]
    assert cross_host.spreads(entries, "native")["E8 mAP gain"] == pytest.approx(2.02)
    assert cross_host.spreads(entries, "avx2") == {}


def test_spread_is_the_largest_recorded_difference_of_the_path():
    assert cross_host.spreads(ENTRIES, "native") == pytest.approx({"E8 mAP gain": 2.02, "x": 0.5})
    assert cross_host.spreads(ENTRIES, "not recorded") == cross_host.spreads(ENTRIES, "native")
    assert cross_host.spreads(ENTRIES, "avx2") == {}


@pytest.mark.parametrize(
    "ours,spread,flips",
    [
        (2.38, 2.02, False),
        (1.5, 2.02, True),
        (-0.5, 0.4, False),
        (-0.5, 0.6, True),
        (80.0, 2.0, True),
        (2.0, 0.0, False),
    ],
)
def test_a_verdict_flips_when_the_spread_crosses_a_boundary(ours, spread, flips):
    # boundaries of the mAP claim: 0 (not supported / same direction) and 81.3 (supported)
    assert cross_host.verdict_flips(ours, CLAIMS["map"]["value"], spread, _verdict) is flips


def test_report_text_names_the_path_and_the_verdicts_the_machine_can_flip():
    rows = [
        {"claim": CLAIMS["map"]["claim"], "claimed": 81.3, "ours": 1.5, "verdict": "same direction, smaller"},
        {"claim": CLAIMS["flops"]["claim"], "claimed": 46.7, "ours": 50.0, "verdict": "supported"},
    ]
    text, checks = cross_host.machines_markdown(rows, CLAIMS, {"native", "not recorded"}, _verdict, ENTRIES)
    assert [c["claim"] for c in checks] == [CLAIMS["map"]["claim"]]  # FLOPs are counted, not computed
    assert checks[0]["flips"] and "**yes: the machine can flip it**" in text and "±2.02 points" in text
    assert "| b | native | E8 mAP gain | 1 | 1.5 | 0.5 |" in text
    text, checks = cross_host.machines_markdown(rows, CLAIMS, {"avx2"}, _verdict, ENTRIES)
    assert not checks[0]["flips"] and "0 (same bytes)" in text and "`avx2`" in text


def test_numeric_paths_of_runs():
    runs = [{"numerics": {"path": "avx2"}}, {"numerics": {"path": "avx2", "env": {}}}]
    assert cross_host.numeric_paths(runs) == {"avx2"}
    assert cross_host.numeric_paths([*runs, {"top1": 1.0}]) == {"avx2", "not recorded"}


def test_bad_record_is_one_clear_error(tmp_path):
    bad = tmp_path / "cross_host.yaml"
    bad.write_text("entries:\n  - path: native\n    values: {E8 mAP gain: [1.0]}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"entries\[0\]\.values\.E8 mAP gain: expected \[machine A, machine B\]"):
        cross_host.load_record(bad)
