"""The data stage through DVC, in a temporary repository: repro, push, fresh clone, pull; repro offline."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }


def _run(cwd: Path, *argv: str) -> str:
    res = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(argv)} failed in {cwd}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _hashes(root: Path, paths: list[str]) -> dict[str, str]:
    out = {}
    for rel in paths:
        p = root / rel
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _lock_outs(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for o in lock["stages"]["data"]["outs"]}


@pytest.mark.slow
def test_data_stage_round_trip(tmp_path: Path) -> None:
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["data"]
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    repo.mkdir()
    for dep in stage["deps"]:  # files and folders (a folder when the stage needs all of it)
        (repo / dep).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / dep).is_dir():
            shutil.copytree(ROOT / dep, repo / dep, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / dep, repo / dep)
    shutil.copy2(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"data": stage}}, sort_keys=False))
    _run(repo, "git", "init", "-q")
    _run(repo, "dvc", "init", "-q")
    _run(repo, "dvc", "remote", "add", "-d", "store", str(remote))

    _run(repo, "dvc", "repro", "data")
    outs = _lock_outs(repo)
    assert {"data/mini", "outputs/data/figures", "outputs/data/manifest_coco.json"} <= set(outs)
    # the manifests are kept in git; data and figures in DVC's cache
    assert "/mini" in (repo / "data" / ".gitignore").read_text()
    assert "manifest" not in (repo / "outputs" / "data" / ".gitignore").read_text()
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "data stage")
    _run(repo, "dvc", "push")
    assert any(remote.rglob("*"))

    # a fresh clone gets identical files from the remote
    clone = tmp_path / "clone"
    _run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "data" / "mini").exists()
    _run(clone, "dvc", "pull")
    tracked = ["data/mini", "outputs/data"]
    original = _hashes(repo, tracked)
    assert len(original) > 1900
    assert _hashes(clone, tracked) == original
    assert "up to date" in _run(clone, "dvc", "status", "data")

    # a fresh clone without the remote (no network): `dvc repro data` regenerates the same data
    offline = tmp_path / "offline"
    _run(tmp_path, "git", "clone", "-q", str(repo), str(offline))
    _run(offline, "dvc", "remote", "remove", "store")
    _run(offline, "dvc", "repro", "data")
    again = _lock_outs(offline)
    for path in (
        "data/mini",
        "outputs/data/manifest_imagenet.json",
        "outputs/data/manifest_coco.json",
        "outputs/data/manifest_ade20k.json",
    ):
        assert again[path] == outs[path], path
    assert _hashes(offline, ["data/mini"]) == _hashes(repo, ["data/mini"])
