"""Source of notebooks/90_report.ipynb (run from the repository root to regenerate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_notebook import make_notebook  # noqa: E402

make_notebook(
    "notebooks/90_report.ipynb",
    "# 90 · The report (E8 and everything else)\n\n"
    "Assembles `reports/report.md` (and `report.html`) from the outputs of every stage: the tables "
    "of E1–E6, the figures, the environment, and E8, the abstract's claims recomputed in their own "
    "form from our tables. A stage that has not run shows as such. The defaults write a smoke copy.",
    'outputs_dir = "outputs"  # where the stages wrote their results\n'
    'report = "outputs/smoke/report/report.md"  # the report (the stage: reports/report.md)',
    [
        "from IPython.display import Markdown, display\n\n"
        "from anchorformer.report import build_report, headline_markdown",
        "result = build_report(outputs_dir, report)\n"
        "print(result['markdown'], result['html'])\n"
        "result['sections']",
        "#md ## E8 · headline check",
        "display(Markdown(headline_markdown(result['headline'])))",
        "#md ## The whole report",
        "display(Markdown(result['markdown'].read_text()))",
    ],
)
