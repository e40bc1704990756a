"""Source of notebooks/31_ade20k_summary.ipynb (run from the repository root to regenerate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_notebook import make_notebook  # noqa: E402

make_notebook(
    "notebooks/31_ade20k_summary.ipynb",
    "# 31 · ADE20K semantic segmentation (E6): the results table\n\n"
    "Reads the run folders written by the `seg@*` stages (notebook 30): backbone, head, params, GMACs at "
    "512² (backbone + pyramid + decode head), mIoU, mAcc and aAcc (single scale, percent) per run, and "
    "writes `summary.md` / `summary.json`, and the params and GMACs at 512² of the standard (full-profile) "
    "models. Paper values are not public (REFERENCE §4 lists unverified "
    "third-party numbers only). The defaults below are a seconds-long smoke configuration: the runs named "
    "in `smoke_runs` are trained first (tiny models, two iterations) when their folders are empty; the DVC "
    "stage `seg-summary` passes the values of `params.yaml` and no smoke runs.",
    # parameters (papermill reads one '=' per line: no '=' in the values or comments)
    'seg_dir = ""  # the run folders: <seg_dir>/<run>/metrics.json; empty: a temporary folder (smoke)\n'
    'runs = "anchorformer_t_fpn deit_t_fpn"  # space-separated run names, the table rows\n'
    'out_dir = ""  # summary.json and summary.md; empty: <seg_dir>/summary\n'
    "smoke_runs = 1  # 1: train the runs named in runs (tiny models, seconds) when missing; the stage passes 0\n"
    'complexity_of = "anchorformer_tiny_patch16_224:fpn"  # space-separated backbone:head pairs counted at 512²\n'
    'complexity_profile = "full"  # the preset whose model sizes are counted (full: the standard models)',
    [
        "import json\n"
        "import tempfile\n"
        "from pathlib import Path\n\n"
        "from IPython.display import Markdown, display\n\n"
        "from anchorformer.data.synthetic import make_mini_ade20k\n"
        "from anchorformer.engine.seg_report import (\n"
        "    complexity_markdown,\n"
        "    complexity_rows,\n"
        "    load_runs,\n"
        "    results_markdown,\n"
        "    write_summary,\n"
        ")\n"
        "from anchorformer.engine.segmentation import resolve_config, train_segmentation",
        'seg_dir = seg_dir or tempfile.mkdtemp(prefix="seg_summary_smoke_")\n'
        'out_dir = out_dir or str(Path(seg_dir) / "summary")\n'
        "names = str(runs).split()",
        "#md ## Smoke runs (skipped in the pipeline)",
        "if int(smoke_runs):\n"
        '    data = Path(seg_dir) / "data" / "ADEChallengeData2016"\n'
        "    if not data.is_dir():\n"
        "        make_mini_ade20k(data, seed=0, num_train=4, num_val=2)\n"
        '    tiny = ["model_sizes.tiny={embed_dim: 32, depth: 1, num_heads: 2}", "num_anchors=4", "pyramid_channels=16"]\n'
        '    tiny += ["head_channels=16", "crop_size=64", "batch_size=2", "test_crop_size=64", "test_stride=48", "test_scale=[256, 64]"]\n'
        "    for name in names:\n"
        '        if not (Path(seg_dir) / name / "metrics.json").is_file():\n'
        '            backbone = "anchorformer_tiny_patch16_224" if name.startswith("anchor") else "deit_tiny_patch16_224"\n'
        '            cfg = resolve_config("mini", tiny, backbone=backbone, head="fpn")\n'
        "            train_segmentation(data, Path(seg_dir) / name, cfg, iters=2)",
        "#md ## Results",
        "rows = load_runs(seg_dir, names)\n"
        "paths = write_summary(out_dir, rows)\n"
        "display(Markdown(results_markdown(rows)))",
        'print(json.dumps([{k: r.get(k) for k in ("run", "backbone", "head", "gmacs", "mIoU", "mAcc", "aAcc")} for r in rows], indent=1))',
        "#md ## Complexity of the standard models: backbone + pyramid + decode head at 512²",
        'pairs = [tuple(p.split(":")) for p in str(complexity_of).split()]\n'
        "crows = complexity_rows(pairs, profile=complexity_profile)\n"
        '(Path(out_dir) / "complexity.json").write_text(json.dumps(crows, indent=1) + "\\n")\n'
        '(Path(out_dir) / "complexity.md").write_text(complexity_markdown(crows))\n'
        "display(Markdown(complexity_markdown(crows)))",
        "# NBVAL_CHECK_OUTPUT\nprint(complexity_markdown(crows))",
    ],
)
