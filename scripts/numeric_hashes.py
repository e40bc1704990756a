"""The small pipeline whose output hashes pin the CPU numeric path (``tests/numeric_hashes.json``).

Three runs through the ``anchorformer`` command, each a few seconds on one core: a CNN
classification run (the mini teacher's ResNet-10T, one epoch on 64 images), one detection iteration
block (Mask R-CNN on AnchorFormer-T, one epoch of one batch) and one segmentation block (Semantic
FPN on AnchorFormer-T, 4 iterations), all on the mini datasets of seed 0. Any x86-64 machine with
AVX2 that follows the numeric path (``anchorformer/engine/numerics.py``) writes the same bytes;
a machine that computes otherwise fails ``tests/test_numeric_path.py``, which names the outputs
that changed::

    python scripts/numeric_hashes.py              # run it, compare with tests/numeric_hashes.json
    python scripts/numeric_hashes.py --write      # run it, write tests/numeric_hashes.json

The commands are started without the numeric settings in their environment: the command line
sets them itself in the mini profile, and this checks that it does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HASHES = ROOT / "tests" / "numeric_hashes.json"
SETTINGS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS")
COMMON = ["--resume", "never"]
# fmt: off
RUNS: dict[str, list[str]] = {
    "cls-cnn": ["train", "cls", "--data", "{data}/imagenet", "--out", "{out}", "--model", "resnet10t", "--epochs", "1",
                "--set", "model_kwargs={{channels: [32, 64, 128, 256]}}", "--set", "max_train_images=64",
                "--set", "max_eval_images=20"],
    "det": ["train", "det", "--data", "{data}/coco", "--out", "{out}", "--epochs", "1",
            "--set", "max_train_images=4", "--set", "max_eval_images=2"],
    "seg": ["train", "seg", "--data", "{data}/ade20k/ADEChallengeData2016", "--out", "{out}", "--iters", "4",
            "--max-eval-images", "2"],
}
# fmt: on
# What each run's results are: the files DVC would hash (timings.json and checkpoints/ are not).
RESULTS: dict[str, tuple[str, ...]] = {
    "cls-cnn": ("metrics.json", "history.json", "model.safetensors"),
    "det": ("metrics.json", "run.json", "detections.json", "model.safetensors"),
    "seg": ("metrics.json", "per_class.json", "predictions", "model.safetensors"),
}


def _digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, sorted)."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    elif path.name == "metrics.json":
        h.update(_without_code_version(path.read_bytes()))
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


def _without_code_version(raw: bytes) -> bytes:
    """A ``metrics.json`` with the code version of each segment blanked (``code_versions``: the hash
    of the package's files, which any edit changes): the hashes pin the numbers, not the commit."""
    metrics = json.loads(raw)
    for segment in metrics.get("code_versions") or []:
        segment["version"] = "-"
    return json.dumps(metrics, indent=1, sort_keys=True).encode()


def run_pipeline(
    data: str | os.PathLike, out: str | os.PathLike, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Run the three runs on the mini datasets ``data`` into ``out``; ``{"run/file": sha256}``.

    ``env``: the commands' environment (default: this one without the numeric settings).
    Raises ``RuntimeError`` with the command's last lines when a run fails.
    """
    env = dict({k: v for k, v in os.environ.items() if k not in SETTINGS} if env is None else env)
    env.setdefault("HF_HUB_OFFLINE", "1")
    hashes: dict[str, str] = {}
    for name, args in RUNS.items():
        run_dir = Path(out) / name
        argv = [a.format(data=data, out=run_dir) for a in args] + COMMON
        done = subprocess.run(
            [sys.executable, "-m", "anchorformer.cli", *argv], env=env, capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            raise RuntimeError(f"{name}: anchorformer {' '.join(argv)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        for result in RESULTS[name]:
            hashes[f"{name}/{result}"] = _digest(run_dir / result)
    return hashes


def compare(expected: Mapping[str, str], got: Mapping[str, str]) -> list[str]:
    """One line per output whose hash is not the committed one (empty: the same bytes)."""
    lines = []
    for key in sorted(set(expected) | set(got)):
        if expected.get(key) != got.get(key):
            lines.append(f"{key}: sha256 {str(got.get(key))[:12]}, committed {str(expected.get(key))[:12]}")
    return lines


def load_expected(path: str | os.PathLike = HASHES) -> dict[str, str]:
    """The committed hashes (``tests/numeric_hashes.json``)."""
    return dict(json.loads(Path(path).read_text(encoding="utf-8"))["hashes"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"write the hashes to {HASHES.relative_to(ROOT)}")
    p.add_argument("--data", default=None, help="the mini datasets (default: made afresh, seed 0)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="anchorformer-numeric-") as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "data")
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            subprocess.run([sys.executable, "-m", "anchorformer.cli", "data", "make-mini", "--out", data], env=env,
                           check=True, capture_output=True)  # fmt: skip
        got = run_pipeline(data, Path(tmp) / "runs")
    if args.write:
        record = {
            "about": "sha256 of the results of scripts/numeric_hashes.py's small pipeline on the CPU numeric path "
            "(anchorformer/engine/numerics.py); rewrite with `python scripts/numeric_hashes.py --write`",
            "hashes": got,
        }
        HASHES.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {len(got)} hashes to {HASHES}")
        return 0
    problems = compare(load_expected(), got)
    for line in problems:
        print(line)
    print("the same bytes as committed" if not problems else f"{len(problems)} outputs differ from the committed bytes")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
