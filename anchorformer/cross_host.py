"""How far results move with the machine: the cross-machine record and the E8 verdicts it can flip.

``anchorformer/configs/cross_host.yaml`` records results of the same code, parameters and seed
measured on different machines, with the CPU numeric path the runs followed
(:mod:`anchorformer.engine.numerics`: ``avx2`` with the settings, ``native`` without). The report
(E8) reads the path its runs recorded in their ``metrics.json``, takes the largest spread the
record holds for an E8 gain on that path, and says for each claim whether a gain that far up or
down would read another verdict: such a verdict hangs on the machine, not on the method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .tables import markdown_table

__all__ = ["CROSS_HOST", "E8_KEYS", "load_record", "machines_markdown", "numeric_paths", "spreads", "verdict_flips"]

CROSS_HOST = Path(__file__).resolve().parent / "configs" / "cross_host.yaml"
E8_KEYS = {"accuracy": "E8 accuracy gain", "map": "E8 mAP gain"}  # claim -> the record's metric name


def load_record(path: str | Path = CROSS_HOST) -> list[dict[str, Any]]:
    """The record's entries, each with ``when``, ``machines`` (two), ``path``, ``values``, ``note``."""
    import yaml

    entries = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("entries") or []
    for i, e in enumerate(entries):
        for key, pair in (e.get("values") or {}).items():
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)):
                raise ValueError(
                    f"{path}: entries[{i}].values.{key}: expected [machine A, machine B] numbers, got {pair!r}"
                )
    return entries


def numeric_paths(metrics: Iterable[Mapping[str, Any]]) -> set[str]:
    """The numeric paths the runs' ``metrics.json`` record (``"not recorded"`` for runs from before the record)."""
    return {(m.get("numerics") or {}).get("path", "not recorded") for m in metrics}


def spreads(entries: Iterable[Mapping[str, Any]], path: str) -> dict[str, float]:
    """The largest recorded |A − B| of each metric on numeric ``path`` (a path not ``avx2`` counts as ``native``)."""
    want = "avx2" if path == "avx2" else "native"
    out: dict[str, float] = {}
    for e in entries:
        if e.get("path") != want:
            continue
        for key, (a, b) in (e.get("values") or {}).items():
            out[key] = max(out.get(key, 0.0), abs(float(a) - float(b)))
    return out


def verdict_flips(
    ours: float | None, claimed: float, spread: float, verdict: Callable[[float | None, float], str]
) -> bool:
    """Whether a gain ``spread`` points up or down from ``ours`` reads another ``verdict``."""
    if ours is None or not spread:
        return False
    return len({verdict(ours - spread, claimed), verdict(ours, claimed), verdict(ours + spread, claimed)}) > 1


def machines_markdown(
    rows: Iterable[Mapping[str, Any]],
    claims: Mapping[str, Mapping[str, Any]],
    paths: set[str],
    verdict: Callable[[float | None, float], str],
    entries: list[dict[str, Any]] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """The E8 "Across machines" text: the runs' path, each trained claim with its spread, the record.

    Args:
        rows: the trained E8 rows (``claim``, ``claimed``, ``ours``, ``verdict``).
        claims: the report's ``CLAIMS`` (key -> ``claim`` text, ``value``).
        paths: the numeric paths the runs recorded (:func:`numeric_paths`).
        verdict: the report's verdict rule ``(ours, claimed) -> str``.
        entries: the record (default: :func:`load_record`).

    Returns:
        The markdown and one dict per claim with a record key: ``claim``, ``ours``, ``spread``,
        ``verdict``, ``flips``.
    """
    entries = load_record() if entries is None else entries
    path = "avx2" if paths == {"avx2"} else "native"
    spread = spreads(entries, path)
    by_text = {c["claim"]: k for k, c in claims.items()}
    checks = []
    for r in rows:
        key = by_text.get(r["claim"])
        if key not in E8_KEYS:
            continue
        s = spread.get(E8_KEYS[key], 0.0)
        flips = verdict_flips(r.get("ours"), r["claimed"], s, verdict)
        checks.append(
            {"claim": r["claim"], "ours": r.get("ours"), "spread": s, "verdict": r["verdict"], "flips": flips}
        )
    if path == "avx2":
        head = (
            "The runs followed the CPU numeric path `avx2` (`anchorformer/engine/numerics.py`, recorded in each run's "
            "`metrics.json`): any x86-64 machine with AVX2 computes the same bytes, so no verdict below hangs on the "
            "machine there (on arm64 the path does not apply and results differ). Without the path, results moved "
            "between machines as the record shows.\n"
        )
    else:
        head = (
            f"The runs recorded the numeric path(s) {', '.join(f'`{p}`' for p in sorted(paths)) or '`not recorded`'}, "
            "not `avx2` throughout: their results depend on the machine's arithmetic, by up to the spread the record "
            "holds for the libraries' own code (`native`).\n"
        )
    table = markdown_table(
        [
            {
                **c,
                "ours": "—" if c["ours"] is None else f"{c['ours']:+.2f}%",
                "spread": f"±{c['spread']:.2f} points" if c["spread"] else "0 (same bytes)" if path == "avx2" else "—",
                "flips": "**yes: the machine can flip it**" if c["flips"] else "no",
            }
            for c in checks
        ],
        ["claim", "ours", "spread", "verdict", "flips"],
        ["claim", "ours (best pair)", "spread across machines", "verdict", "can the machine flip it?"],
    )
    lines = []
    for e in entries:
        values = e.get("values") or {}
        for k, (a, b) in values.items():
            lines.append({"when": e.get("when", ""), "path": e.get("path", ""), "metric": k, "a": f"{a:g}",
                          "b": f"{b:g}", "d": f"{abs(b - a):.4g}"})  # fmt: skip
        if not values:
            lines.append({"when": e.get("when", ""), "path": e.get("path", ""), "metric": e.get("note", ""), "d": "0"})
    record = markdown_table(
        lines,
        ["when", "path", "metric", "a", "b", "d"],
        ["measured", "path", "result", "machine A", "machine B", "|A − B|"],
    )
    machines = "; ".join(f"{i + 1}: {' vs '.join(e.get('machines') or [])}" for i, e in enumerate(entries))
    text = (
        head
        + "\n"
        + table
        + "\n\nThe record (`anchorformer/configs/cross_host.yaml`; machines "
        + machines
        + "):\n\n"
        + record
    )
    return text, checks
