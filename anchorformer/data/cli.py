"""``anchorformer data``: make the mini sets, verify a dataset, run the pipeline's data stage.

    anchorformer data make-mini --out DIR [--seed 0]
    anchorformer data verify {imagenet,coco,ade20k} ROOT [--expect auto|full|mini] [--on-bad fail|skip]
                             [--manifest PATH] [--no-decode] [--workers N]
    anchorformer data stage --profile mini|full [--mini-dir data/mini] [--out outputs/data] [--seed 0]
                            [--imagenet-root R] [--coco-root R] [--ade20k-root R]

A failed verification prints one message naming every problem (missing folders with the
expected layout, files that do not decode, counts that differ) and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from .files import ON_BAD
from .stage import PROFILES, run_data_stage
from .synthetic import make_mini_datasets
from .verify import DATASETS, EXPECT, verify_dataset, write_manifest

__all__ = ["register"]


def _summary(manifest: dict[str, Any]) -> str:
    if "skipped" in manifest:
        return f"{manifest['dataset']}: skipped ({manifest['skipped']})"
    splits = ", ".join(
        f"{split}: " + " ".join(f"{v} {k}" for k, v in counts.items()) for split, counts in manifest["splits"].items()
    )
    bad = (
        f"; {len(manifest['bad_files'])} bad files skipped: {manifest['bad_files'][:10]}"
        if manifest["bad_files"]
        else ""
    )
    anns = manifest.get("bad_annotations") or []
    if anns:
        bad += f"; {len(anns)} bad annotations skipped: " + "; ".join(anns[:10]) + ("; ..." if len(anns) > 10 else "")
    return (
        f"{manifest['dataset']} ({manifest['expect']}) OK at {manifest['root']}: {splits}; "
        f"{manifest['files']} files, {manifest['bytes'] / 2**20:.1f} MiB, list sha256 {manifest['file_list_sha256'][:12]}{bad}"
    )


def _make_mini(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    paths = make_mini_datasets(args.out, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _verify(args: argparse.Namespace) -> int:
    manifest = verify_dataset(
        args.dataset, args.root, expect=args.expect, on_bad=args.on_bad, decode=not args.no_decode, workers=args.workers
    )
    if args.manifest:
        write_manifest(manifest, args.manifest)
    print(_summary(manifest))
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
    return 0


def _stage(args: argparse.Namespace) -> int:
    manifests = run_data_stage(
        args.profile,
        mini_dir=args.mini_dir,
        out_dir=args.out,
        seed=args.seed,
        imagenet_root=args.imagenet_root,
        coco_root=args.coco_root,
        ade20k_root=args.ade20k_root,
        on_bad=args.on_bad,
        decode=not args.no_decode,
        workers=args.workers,
    )
    for manifest in manifests.values():
        print(_summary(manifest))
    return 0


def _add_check_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--on-bad",
        choices=ON_BAD,
        default="fail",
        help="a file that does not decode, an unusable annotation: fail, or skip and list it (default fail)",
    )
    p.add_argument("--no-decode", action="store_true", help="check layout, counts and references only")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPU count, at most 16)")


def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="datasets: make the mini sets, verify a dataset, the data stage")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = sub.add_parser("make-mini", help="write the mini ImageNet/COCO/ADE20K-format sets into DIR")
    p.add_argument("--out", required=True, help="DIR: gets imagenet/, coco/, ade20k/ADEChallengeData2016/")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_mini)

    p = sub.add_parser("verify", help="check a dataset's layout, counts and files; write its manifest")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("root", help="the dataset's root (ADE20K: the ADEChallengeData2016 folder)")
    p.add_argument(
        "--expect", choices=EXPECT, default="auto", help="counts to expect: full, mini (ROOT/mini.json), auto (default)"
    )
    p.add_argument("--manifest", help="write the manifest JSON here")
    p.add_argument("--json", action="store_true", help="also print the manifest")
    _add_check_options(p)
    p.set_defaults(func=_verify)

    p = sub.add_parser("stage", help="the pipeline's data stage: make the mini sets, verify the profile's data")
    p.add_argument("--profile", choices=PROFILES, required=True)
    p.add_argument("--mini-dir", default="data/mini", help="where the mini sets are written (default data/mini)")
    p.add_argument("--out", default="outputs/data", help="where the manifests go (default outputs/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--imagenet-root", default=None, help="full profile: ImageNet root")
    p.add_argument("--coco-root", default=None, help="full profile: COCO 2017 root")
    p.add_argument("--ade20k-root", default=None, help="full profile: the ADEChallengeData2016 folder")
    _add_check_options(p)
    p.set_defaults(func=_stage)
