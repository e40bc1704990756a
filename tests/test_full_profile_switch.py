"""One switch to the full profile: ``dvc exp run -S profile=full`` plus the three dataset roots
and the teacher file; every stage reads its dataset from ``data.*_root``; ``nproc: auto``."""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anchorformer.engine import launch

ROOT = Path(__file__).resolve().parents[1]
SWITCH = {  # the README's "Switch with the roots set": five -S
    "profile": "full",
    "data.imagenet_root": "/mnt/imagenet",
    "data.coco_root": "/mnt/coco",
    "data.ade20k_root": "/mnt/ADEChallengeData2016",
    "cls.teacher_checkpoint": "/mnt/teachers/regnety_160.deit_in1k.safetensors",
}


def _set(params: dict, dotted: str, value: str) -> None:
    *path, last = dotted.split(".")
    node = params
    for key in path:
        node = node[key]
    assert last in node, dotted
    node[last] = value


def _resolved(folder: Path) -> dict[str, dict]:
    """Every stage: its command, deps, outs and ``upstream`` (the stages it needs, transitively)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(folder)) as repo:
        graph = repo.index.graph  # edges run from a stage to the stages it depends on
        return {
            s.name: {
                "cmd": s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd),
                "deps": [str(d.def_path) for d in s.deps if not hasattr(d, "params")],
                "outs": [str(o.def_path) for o in s.outs],
                "upstream": {getattr(u, "name", "") for u in nx.descendants(graph, s)},
            }
            for s in repo.index.stages
            if getattr(s, "cmd", None)
        }


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """The stages of this dvc.yaml resolved by DVC with params.yaml as it is (mini) and with the
    switch's five parameters set (full), in a copy."""
    out = {"mini": _resolved(ROOT)}
    folder = tmp_path_factory.mktemp("full")
    shutil.copy(ROOT / "dvc.yaml", folder / "dvc.yaml")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=folder, check=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in SWITCH.items():
        _set(params, key, value)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out["full"] = _resolved(folder)
    return out


def _read_paths(stage: dict) -> list[str]:
    """What a stage reads: its deps and every word of its command but the data stage's output folder."""
    words = shlex.split(stage["cmd"])
    skip = {i + 2 for i, w in enumerate(words) if w == "-p" and i + 1 < len(words) and words[i + 1] == "mini_dir"}
    return stage["deps"] + [w for i, w in enumerate(words) if i not in skip]


def test_no_stage_of_the_full_profile_reads_the_mini_sets(stages):
    full = stages["full"]
    assert len(full) == len(stages["mini"]) > 20
    for name, stage in full.items():
        for path in _read_paths(stage):
            assert "data/mini" not in path, f"{name} reads {path}"
    # the roots reach the stages that train and show data
    reads = {name: " ".join(_read_paths(s)) for name, s in full.items()}
    for prefix, root in (("cls-e1", "/mnt/imagenet"), ("det@", "/mnt/coco"), ("seg@", "/mnt/ADEChallengeData2016")):
        assert any(n.startswith(prefix) for n in reads)
        for name in (n for n in reads if n.startswith(prefix)):
            assert f"-p data {root}" in reads[name], name
    assert "-p data /mnt/imagenet" in reads["anchor-maps"]


def test_the_mini_profile_reads_the_embedded_sets(stages):
    """The mini profile's commands name the same data folders as before the roots were merged."""
    reads = {name: " ".join(_read_paths(s)) for name, s in stages["mini"].items()}
    for prefix, root in (("cls-", "data/mini/imagenet"), ("det@", "data/mini/coco"), ("seg@", "data/mini/ade20k/ADEChallengeData2016")):  # fmt: skip
        for name in (n for n in reads if n.startswith(prefix) and "-p data " in reads[n]):
            assert f"-p data {root} " in reads[name], name


def test_distilled_stages_depend_on_the_teacher_of_the_profile(stages):
    for profile, teacher in (("mini", "outputs/cls/teacher/model.pth"), ("full", SWITCH["cls.teacher_checkpoint"])):
        distilled = {n: s for n, s in stages[profile].items() if n.startswith("cls-e1-distilled")}
        assert len(distilled) == 4
        for name, stage in distilled.items():
            assert teacher in stage["deps"], (profile, name, stage["deps"])
            assert f"teacher_checkpoint={teacher};" in stage["cmd"], name
    assert "outputs/cls/teacher/model.pth" in stages["mini"]["cls-teacher"]["outs"]


def test_the_full_profile_pipeline_does_not_need_the_mini_teacher(stages):
    """``dvc exp run ... report bench`` (the README) runs every stage but the mini teacher's in full."""
    for profile, left_out in (("mini", set()), ("full", {"cls-teacher"})):
        needed = stages[profile]["report"]["upstream"] | {"report", "bench"}
        assert set(stages[profile]) - needed == left_out, profile
        for name in (n for n in stages[profile] if n.startswith("cls-e1-distilled")):
            assert ("cls-teacher" in stages[profile][name]["upstream"]) == (profile == "mini"), name


def test_every_stage_runs_on_auto_processes_by_default():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["cls"]["nproc"] == params["det"]["nproc"] == params["seg"]["nproc"] == "auto"


def test_nproc_auto_uses_every_visible_gpu_and_one_process_on_a_cpu(monkeypatch, caplog):
    monkeypatch.setattr(launch, "_visible_gpus", lambda: 0)
    assert launch.resolve_nproc("auto") == 1 and launch.resolve_nproc(1) == 1
    monkeypatch.setattr(launch, "_visible_gpus", lambda: 8)
    with caplog.at_level(logging.WARNING, logger=launch.__name__):
        assert launch.resolve_nproc("auto") == 8 and launch.resolve_nproc("8") == 8
        assert launch.resolve_nproc("auto", device="cpu") == 1  # the mini recipes run on the CPU
        assert launch.resolve_nproc(2, device="cpu") == 2
        assert not caplog.records
        assert launch.resolve_nproc(2) == 2
    assert len(caplog.records) == 1 and "2 process(es) while 8 GPUs are visible" in caplog.text
    for bad in ("0", "two", "1.5", -1):
        with pytest.raises(ValueError, match="nproc must be 'auto' or a positive integer"):
            launch.resolve_nproc(bad)


def test_the_full_profile_refuses_the_mini_sets_unless_dry(mini_data, tmp_path):
    """``dvc exp run -S profile=full`` without the roots stops at the data stage, in one line."""
    from anchorformer.data.stage import run_data_stage

    roots = {
        "imagenet_root": mini_data / "imagenet",
        "coco_root": "",
        "ade20k_root": mini_data / "ade20k" / "ADEChallengeData2016",
    }
    common = dict(mini_dir=mini_data, out_dir=tmp_path / "out", make_mini=False, decode=False, **roots)
    with pytest.raises(ValueError) as e:
        run_data_stage("full", **common)
    message = str(e.value)
    assert message.startswith(f"profile full: data.imagenet_root={mini_data / 'imagenet'} is a generated mini set")
    assert "dry_run=true" in message and "\n" not in message
    assert not list((tmp_path / "out").glob("manifest_*.json"))
    manifests = run_data_stage("full", dry_run=True, **common)
    assert manifests["imagenet"]["expect"] == manifests["ade20k"]["expect"] == "mini"
    assert manifests["coco"] == {"dataset": "coco", "expect": "full", "skipped": "no root given"}
