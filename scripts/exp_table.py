"""The headline metrics of the experiments, one row per metric, one column per experiment.

``dvc exp show`` gives every metric of every run a column named by its file, far wider than a
terminal. This runs it with the headline filter (top-1 of each E1-E3 run, box and mask AP of each
E5 run, mIoU of each E6 run) and prints the table the other way round::

    python scripts/exp_table.py            # the workspace and the experiments of HEAD
    python scripts/exp_table.py -A -n 3    # more: any options of dvc exp show

The same filter for ``dvc exp show`` itself is ``KEEP`` below (with ``--drop '.*' --keep``).
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys

KEEP = r"^Experiment$|outputs/cls/e[1239]/.*:top1$|outputs/det/.*:(bbox|segm)_AP$|outputs/seg/.*:mIoU$"


def short(column: str) -> str:
    """``outputs/cls/e1/deit_tiny_patch16_224/metrics.json:top1`` -> ``cls/e1/deit_tiny_patch16_224 top1``."""
    path, _, key = column.rpartition(":")
    return f"{path.removeprefix('outputs/').removesuffix('/metrics.json')} {key}"


def transpose(csv_text: str, precision: int = 1) -> str:
    """The CSV of ``dvc exp show --csv`` as an aligned text table: metrics as rows, experiments as columns."""
    rows = list(csv.reader(io.StringIO(csv_text)))
    if not rows:
        return ""
    header, body = rows[0], rows[1:]
    name, rev = header.index("Experiment"), header.index("rev") if "rev" in header else None
    names = [r[name] or (r[rev] if rev is not None else "") for r in body]
    lines = [["metric", *names]]
    for i, col in enumerate(header):
        if col in ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor"):
            continue
        cells = []
        for r in body:
            try:
                cells.append(f"{float(r[i]):.{precision}f}")
            except (ValueError, IndexError):
                cells.append(r[i] if i < len(r) and r[i] else "-")
        lines.append([short(col), *cells])
    widths = [max(len(line[j]) for line in lines) for j in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = [
        sys.executable,
        "-m",
        "dvc",
        "exp",
        "show",
        "--csv",
        "--no-pager",
        "--drop",
        ".*",
        "--keep",
        KEEP + "|^rev$",
        *argv,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
        return done.returncode
    sys.stdout.write(transpose(done.stdout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
