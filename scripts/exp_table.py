"""The headline metrics of the experiments, one row per metric, one column per experiment.

The pipeline's one declared metrics file is the report's ``reports/headline.json``: top-1 of each
E1/E2/E3/E9 run, box and mask AP of each E5 run, mIoU of each E6 run, named ``e1.AF-T``,
``e5.DeiT-T.box``, ... ``dvc exp show`` lists them, one column each, beside every parameter;
``--drop '.*' --keep`` with :data:`KEEP` (or one experiment's :func:`keep` filter, which fits a
200-column terminal) shows only them. This prints the table the other way round::

    python scripts/exp_table.py            # the workspace and the experiments of HEAD
    python scripts/exp_table.py -A -n 3    # more: any options of dvc exp show
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys

KEEP = r"^Experiment$|^e\d+\."


def keep(experiments: str) -> str:
    """The ``--keep`` filter of some experiments: ``keep("1")`` (E1), ``keep("[239]")``, ``keep("5")``."""
    return rf"^Experiment$|^e{experiments}\."


def short(column: str) -> str:
    """``e1.AF-T`` -> ``e1 AF-T``; ``e5.DeiT-T.box`` -> ``e5 DeiT-T box`` (a column's words)."""
    return " ".join(column.rpartition(":")[2].split("."))


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
