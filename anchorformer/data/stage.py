"""The ``data`` stage of the pipeline: make the mini sets, verify the profile's datasets, write manifests.

DVC runs one command whatever the profile (``params.yaml``'s ``profile``), so the behaviour
switches here:

- both profiles: the mini sets are generated into ``mini_dir`` (``data/mini``, a DVC output:
  cached, pushable, and the data of every later stage in the mini profile; same seed, same bytes);
- ``mini``: the three mini sets are verified against their ``mini.json``;
- ``full``: the real datasets at the given roots are verified against the released counts
  (a root left empty is skipped, and its manifest says so). A root that is a generated mini set
  (it holds ``mini.json``; the parameters' defaults) is refused with one line saying which
  parameter to set, unless the run is dry (``dry_run``: the full recipes on the mini sets), when
  it is verified as the mini set it is.

Each verified set gets ``out_dir/manifest_<dataset>.json`` (counts and a hash of its file list).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .synthetic import make_mini_datasets, read_mini_manifest
from .verify import DATASETS, verify_dataset, write_manifest

__all__ = ["PROFILES", "manifest_path", "run_data_stage", "stage_roots"]

log = logging.getLogger(__name__)

PROFILES = ("mini", "full")


def manifest_path(out_dir: str | Path, dataset: str) -> Path:
    return Path(out_dir) / f"manifest_{dataset}.json"


def _is_set(root: str | Path | None) -> bool:
    return root is not None and str(root).strip() not in ("", "None", "null")


def stage_roots(
    profile: str,
    mini_dir: str | Path = "data/mini",
    *,
    imagenet_root: str | Path | None = None,
    coco_root: str | Path | None = None,
    ade20k_root: str | Path | None = None,
) -> dict[str, Path | None]:
    """The roots the ``profile`` uses: the mini sets under ``mini_dir``, or the given full roots
    (None where a full root is not set)."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if profile == "mini":
        mini = Path(mini_dir)
        return {
            "imagenet": mini / "imagenet",
            "coco": mini / "coco",
            "ade20k": mini / "ade20k" / "ADEChallengeData2016",
        }
    given = {"imagenet": imagenet_root, "coco": coco_root, "ade20k": ade20k_root}
    return {name: Path(root) if _is_set(root) else None for name, root in given.items()}


def _expected_counts(profile: str, name: str, root: Path, dry_run: bool) -> str:
    """ "full" or "mini": what ``root`` is verified against (see the module docstring)."""
    if profile == "mini" or not root.is_dir() or read_mini_manifest(root) is None:
        return profile
    if dry_run:
        log.info("data stage (full, dry run): %s root %s is a mini set, verified as one", name, root)
        return "mini"
    raise ValueError(
        f"profile full: data.{name}_root={root} is a generated mini set (it holds {root / 'mini.json'}); "
        f'set data.{name}_root in params.yaml to the real dataset\'s root (README, "Switch with the roots set"), '
        "or run the full recipes dry on the mini sets with dry_run=true"
    )


def run_data_stage(
    profile: str,
    *,
    mini_dir: str | Path = "data/mini",
    out_dir: str | Path = "outputs/data",
    seed: int = 0,
    imagenet_root: str | Path | None = None,
    coco_root: str | Path | None = None,
    ade20k_root: str | Path | None = None,
    on_bad: str = "fail",
    decode: bool = True,
    workers: int | None = None,
    make_mini: bool = True,
    dry_run: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run the data stage.

    Args:
        profile: "mini" or "full".
        mini_dir: where the mini sets are written.
        out_dir: where the manifests go (created).
        seed: the generator's seed.
        imagenet_root, coco_root, ade20k_root: the full datasets' roots (full profile only;
            empty or None skips that dataset).
        on_bad, decode, workers: as in :func:`anchorformer.data.verify.verify_dataset`.
        make_mini: generate the mini sets (False: use those already in ``mini_dir``; the full
            profile then does not touch them).
        dry_run: the pipeline's ``dry_run``: the full profile may then read the mini sets.

    Returns:
        ``{dataset: manifest}``.

    Raises:
        ValueError: an unknown profile; the full profile, not dry, given a mini set's root;
            :class:`~anchorformer.data.verify.VerificationError`.
        FileNotFoundError: a missing folder or file of a dataset's layout.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in DATASETS:  # no manifest of an earlier run may outlive a failure of this one
        manifest_path(out, name).unlink(missing_ok=True)
    if make_mini:
        make_mini_datasets(mini_dir, seed=seed)
    roots = stage_roots(profile, mini_dir, imagenet_root=imagenet_root, coco_root=coco_root, ade20k_root=ade20k_root)
    manifests: dict[str, dict[str, Any]] = {}
    pending: dict[str, dict[str, Any]] = {}
    for name in DATASETS:
        root = roots[name]
        if root is None:
            log.warning("data stage (%s): no %s root given, skipped", profile, name)
            pending[name] = {"dataset": name, "expect": profile, "skipped": "no root given"}
            continue
        expect = _expected_counts(profile, name, root, dry_run)
        pending[name] = verify_dataset(name, root, expect=expect, on_bad=on_bad, decode=decode, workers=workers)
    # only once every dataset passed
    for name, manifest in pending.items():
        write_manifest(manifest, manifest_path(out, name))
        manifests[name] = manifest
    return manifests
