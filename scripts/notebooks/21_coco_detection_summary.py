"""Source of notebooks/21_coco_detection_summary.ipynb (run from the repository root to regenerate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_notebook import make_notebook  # noqa: E402

make_notebook(
    "notebooks/21_coco_detection_summary.ipynb",
    "# 21 · COCO detection (E5): results table and AP under comparable FLOPs\n\n"
    "Reads the run folders written by the `det@*` stages (notebook 20): box and mask AP per backbone "
    "with the backbone GMACs at 1333x800 (x the run's input scale), and, for each DeiT run whose input "
    "was scaled to the GMACs of an AnchorFormer backbone, the relative AP gain in the abstract's form "
    "(AP_A - AP_D) / AP_D. The defaults below are a seconds-long smoke configuration: the runs named "
    "in `smoke_runs` are trained first (tiny models, one epoch) when their folders are empty; the DVC "
    "stage `det_summary` passes the values of `params.yaml` and no smoke runs.",
    # parameters
    'det_dir = "outputs/det_smoke"  # the run folders: <det_dir>/<run>/{metrics,run}.json\n'
    'runs = "anchorformer_t deit_t_matched"  # space-separated run names, the table rows\n'
    'out_dir = "outputs/det_smoke/summary"  # summary.json, summary.md, the figure\n'
    'profile = "mini"  # smoke runs only: the recipe preset\n'
    'data = "outputs/det_smoke/mini/coco"  # smoke runs only: the COCO root (the mini set is made when missing)\n'
    "smoke_runs = (  # smoke only: run=backbone[@matched backbone] trained when missing ('' in the pipeline)\n"
    '    "anchorformer_t=anchorformer_tiny_patch16_224 "\n'
    '    "deit_t_matched=deit_tiny_patch16_224@anchorformer_tiny_patch16_224"\n'
    ")\n"
    "smoke_overrides = (  # smoke only: recipe overrides of the smoke runs\n"
    '    "epochs=1 lr_steps=[1] max_train_images=8 max_eval_images=4 warmup_iters=2 "\n'
    '    "model_sizes.tiny.embed_dim=48 model_sizes.tiny.depth=2 num_anchors=8 out_channels=32 "\n'
    '    "representation_size=64 mask_head_layers=1 mask_head_channels=16 min_size=96 max_size=120"\n'
    ")",
    [
        "import json\n"
        "from pathlib import Path\n\n"
        "from IPython.display import Image, Markdown, display\n\n"
        "from anchorformer.data.synthetic import make_mini_coco\n"
        "from anchorformer.engine.config import apply_overrides, load_profile\n"
        "from anchorformer.engine.detection import train_detection\n"
        "from anchorformer.engine.detection_report import comparable_flops_pairs, load_runs, results_markdown, write_summary\n"
        "from anchorformer.viz import plot_ap_vs_gmacs, save_figure",
        "#md ## Smoke runs (skipped in the pipeline)",
        "for spec in str(smoke_runs).split():\n"
        "    name, _, model = spec.partition('=')\n"
        "    backbone, _, matched = model.partition('@')\n"
        "    if not (Path(det_dir) / name / 'metrics.json').is_file():\n"
        "        coco = Path(data)\n"
        "        if not (coco / 'annotations').is_dir():\n"
        "            make_mini_coco(coco)\n"
        "        cfg = apply_overrides(\n"
        "            load_profile('det', profile),\n"
        "            [f'backbone={backbone}', f'match_macs_of={matched}'] + str(smoke_overrides).split(),\n"
        "        )\n"
        "        train_detection(cfg, coco, Path(det_dir) / name)",
        "#md ## Results",
        "rows = load_runs(det_dir, str(runs).split())\n"
        "pairs = comparable_flops_pairs(rows)\n"
        "paths = write_summary(out_dir, rows, pairs)\n"
        "display(Markdown(results_markdown(rows, pairs)))",
        "print(json.dumps(pairs, indent=1))",
        "fig = plot_ap_vs_gmacs(rows, 'bbox_AP', title='COCO box AP vs backbone GMACs (E5)')\n"
        "display(Image(filename=str(save_figure(fig, Path(out_dir) / 'ap_vs_gmacs')[0])))",
    ],
)
