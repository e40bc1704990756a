"""`anchorformer data verify|make-mini|stage`: clear, specific errors, non-zero exits, manifests."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anchorformer.cli import main
from anchorformer.data.stage import run_data_stage
from anchorformer.data.verify import VerificationError, file_list_digest, verify_dataset

ROOTS = {"imagenet": "imagenet", "coco": "coco", "ade20k": "ade20k/ADEChallengeData2016"}


@pytest.fixture
def copy(mini_data: Path, tmp_path: Path):
    def _copy(name: str) -> Path:
        dest = tmp_path / name
        shutil.copytree(mini_data / ROOTS[name], dest)
        return dest

    return _copy


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name", sorted(ROOTS))
def test_mini_sets_verify_and_manifest(mini_data: Path, tmp_path: Path, name: str, capsys) -> None:
    root = mini_data / ROOTS[name]
    manifest_file = tmp_path / "m.json"
    rc, out, _ = _run(["data", "verify", name, str(root), "--manifest", str(manifest_file)], capsys)
    assert rc == 0 and f"{name} (mini) OK" in out
    manifest = json.loads(manifest_file.read_text())
    assert manifest["expect"] == "mini" and manifest["bad_files"] == [] and manifest["decoded"] is True
    assert manifest == verify_dataset(name, root, workers=1)  # deterministic
    # the file-list hash, recomputed independently
    files = sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256("".join(f"{r}\t{s}\n" for r, s in files).encode()).hexdigest()
    assert manifest["file_list_sha256"] == digest and manifest["files"] == len(files)
    mini = json.loads((root / "mini.json").read_text())
    assert {s: c["images"] for s, c in manifest["splits"].items()} == {
        s: c["images"] for s, c in mini["splits"].items()
    }


def test_digest_changes_with_the_file_list(copy) -> None:
    root = copy("imagenet")
    before = file_list_digest(root)
    (root / "val" / "n00000000" / "extra.jpg").write_bytes(b"x")
    assert file_list_digest(root)["file_list_sha256"] != before["file_list_sha256"]


def test_removed_folder(copy, capsys) -> None:
    root = copy("imagenet")
    shutil.rmtree(root / "val")
    rc, _, err = _run(["data", "verify", "imagenet", str(root)], capsys)
    assert rc == 2
    assert f"missing ImageNet 'val' folder: {root / 'val'}" in err and "expected layout" in err and "n01440764/" in err
    root = copy("ade20k")
    shutil.rmtree(root / "annotations" / "training")
    rc, _, err = _run(["data", "verify", "ade20k", str(root)], capsys)
    assert rc == 2 and f"missing ADE20K annotation folder: {root / 'annotations' / 'training'}" in err
    rc, _, err = _run(["data", "verify", "coco", str(root.parent / "nowhere")], capsys)
    assert rc == 2 and "missing coco root folder" in err and "instances_train2017.json" in err


def test_truncated_jpeg_fail_and_skip(copy, tmp_path: Path, capsys) -> None:
    root = copy("imagenet")
    bad = root / "train" / "n00000004" / "n00000004_00007.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    rc, _, err = _run(["data", "verify", "imagenet", str(root)], capsys)
    assert rc == 2 and f"{bad}: cannot decode image" in err and "truncated" in err
    rc, out, _ = _run(
        ["data", "verify", "imagenet", str(root), "--on-bad", "skip", "--manifest", str(tmp_path / "m.json")], capsys
    )
    assert rc == 0 and "1 bad files skipped" in out
    assert json.loads((tmp_path / "m.json").read_text())["bad_files"] == ["train/n00000004/n00000004_00007.jpg"]
    # without decoding, the truncated file goes unnoticed but layout and counts are checked
    assert main(["data", "verify", "imagenet", str(root), "--no-decode"]) == 0


def test_coco_image_that_does_not_exist(copy, capsys) -> None:
    root = copy("coco")
    ann = root / "annotations" / "instances_val2017.json"
    doc = json.loads(ann.read_text())
    doc["images"][3]["file_name"] = "000000999999.jpg"
    ann.write_text(json.dumps(doc))
    rc, _, err = _run(["data", "verify", "coco", str(root)], capsys)
    assert rc == 2
    assert f"refers to {root / 'val2017' / '000000999999.jpg'}, which does not exist" in err
    assert "1 files that instances_val2017.json does not list" in err


def test_coco_bad_references(copy) -> None:
    root = copy("coco")
    ann = root / "annotations" / "instances_train2017.json"
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["image_id"] = 123456789
    doc["annotations"][1]["category_id"] = 2
    doc["annotations"][2]["segmentation"] = {"counts": "?!", "size": [4]}
    doc["images"][0]["width"] += 5
    ann.write_text(json.dumps(doc))
    with pytest.raises(VerificationError) as e:
        verify_dataset("coco", root)
    msg = str(e.value)
    assert "refers to image_id 123456789" in msg and "has category_id 2, not among the categories" in msg
    assert "segmentation does not decode" in msg and "differs from the annotation's" in msg


def test_ade_label_map_of_the_wrong_size(copy, capsys) -> None:
    root = copy("ade20k")
    ann = root / "annotations" / "validation" / "ADE_val_00000010.png"
    Image.fromarray(np.zeros((7, 9), np.uint8), "L").save(ann)
    rc, _, err = _run(["data", "verify", "ade20k", str(root)], capsys)
    assert rc == 2 and f"{ann}: label map size 9x7 differs from its image's" in err


def test_ade_missing_label_map_and_orphans(copy) -> None:
    root = copy("ade20k")
    (root / "annotations" / "training" / "ADE_train_00000005.png").rename(
        root / "annotations" / "training" / "ADE_train_99999999.png"
    )
    with pytest.raises(VerificationError) as e:
        verify_dataset("ade20k", root, decode=False)
    assert "ADE_train_00000005.png: missing label map of" in str(e.value)
    assert "1 label maps without an image, e.g. ADE_train_99999999.png" in str(e.value)


def test_counts_full_and_mini(copy, capsys) -> None:
    root = copy("coco")
    (root / "val2017" / sorted(p.name for p in (root / "val2017").iterdir())[0]).unlink()
    with pytest.raises(VerificationError, match="which does not exist"):
        verify_dataset("coco", root, decode=False)
    root = copy("imagenet")
    rc, _, err = _run(["data", "verify", "imagenet", str(root), "--expect", "full", "--no-decode"], capsys)
    assert rc == 2 and "1000 images, expected 1281167 (full)" in err and "10 class folders, expected 1000" in err
    (root / "train" / "n00000002" / "n00000002_00000.jpg").unlink()
    rc, _, err = _run(["data", "verify", "imagenet", str(root), "--no-decode"], capsys)
    assert rc == 2 and "999 images, expected 1000 (mini)" in err
    (root / "mini.json").unlink()
    rc, _, err = _run(["data", "verify", "imagenet", str(root), "--expect", "mini"], capsys)
    assert rc == 2 and "is not a generated mini set" in err


def test_stage_profiles(mini_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    manifests = run_data_stage("mini", mini_dir=tmp_path / "mini", out_dir=out, workers=1)
    assert sorted(manifests) == ["ade20k", "coco", "imagenet"]
    for name in manifests:
        on_disk = json.loads((out / f"manifest_{name}.json").read_text())
        assert on_disk["expect"] == "mini" and on_disk == manifests[name]
        # the stage's mini sets are byte-identical to the fixture's (same seed)
        assert on_disk["file_list_sha256"] == file_list_digest(mini_data / ROOTS[name])["file_list_sha256"]
    # full profile on a generated mini set (the roots' defaults): refused by name, no manifest written
    with pytest.raises(ValueError, match="data.imagenet_root=.* is a generated mini set"):
        run_data_stage("full", out_dir=out, imagenet_root=mini_data / "imagenet", decode=False, make_mini=False)
    assert not list(out.glob("manifest_*.json"))
    # full profile on roots that are not the full datasets: fails, and leaves no manifest behind
    other = tmp_path / "not_imagenet"
    shutil.copytree(mini_data / "imagenet", other, ignore=shutil.ignore_patterns("mini.json"))
    with pytest.raises(VerificationError, match="expected 1281167"):
        run_data_stage("full", out_dir=out, imagenet_root=other, decode=False, make_mini=False)
    assert not list(out.glob("manifest_*.json"))
    skipped = run_data_stage("full", out_dir=out, imagenet_root="", coco_root=None, ade20k_root="", make_mini=False)
    assert all("skipped" in m for m in skipped.values())
    with pytest.raises(ValueError, match="profile must be one of"):
        run_data_stage("huge", out_dir=out, make_mini=False)
