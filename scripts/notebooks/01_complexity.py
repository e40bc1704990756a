"""Source of notebooks/01_complexity.ipynb (run from the repository root to regenerate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_notebook import make_notebook  # noqa: E402

make_notebook(
    "notebooks/01_complexity.ipynb",
    "# 01 · Complexity: params and GMACs of AnchorFormer vs DeiT (E4, counted)\n\n"
    "Counts every multiply–accumulate, attention included (`anchorformer.count_macs`), on models "
    "built on the meta device. The defaults below are a seconds-long smoke configuration; the DVC "
    "stage `complexity` passes the values of `params.yaml`.",
    # parameters
    'out_dir = "outputs/complexity_smoke"  # where the JSON, markdown and figure go\n'
    'sizes = "tiny"  # space-separated: tiny small base\n'
    'anchors = "8 30"  # anchor counts M of the models table\n'
    'img_sizes = "224"  # image sides of the models table\n'
    'resolutions = "224 512"  # image sides of the resolution table\n'
    "default_anchors = 30  # M of the resolution table",
    [
        "from pathlib import Path\n\n"
        "from IPython.display import Markdown, display\n\n"
        "from anchorformer.complexity_cli import complexity_tables, tables_markdown, write_complexity\n"
        "from anchorformer.viz import plot_gmacs_vs_resolution, save_figure",
        "tables = complexity_tables(\n"
        "    sizes=sizes.split(),\n"
        "    anchors=[int(m) for m in str(anchors).split()],\n"
        "    img_sizes=[int(s) for s in str(img_sizes).split()],\n"
        "    resolutions=[int(s) for s in str(resolutions).split()],\n"
        "    default_anchors=int(default_anchors),\n"
        ")\n"
        "paths = write_complexity(out_dir, tables)",
        "# NBVAL_CHECK_OUTPUT\nprint(tables_markdown(tables))",
        "fig = plot_gmacs_vs_resolution(tables['resolution'])\n"
        "save_figure(fig, Path(out_dir) / 'gmacs_vs_resolution')",
        "display(Markdown(tables_markdown(tables)))",
    ],
)
