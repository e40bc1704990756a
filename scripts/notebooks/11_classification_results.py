"""Source of notebooks/11_classification_results.ipynb (run from the repository root to regenerate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_notebook import make_notebook  # noqa: E402

make_notebook(
    "notebooks/11_classification_results.ipynb",
    "# 11 · Classification results: E1, E2, E3\n\n"
    "Tables and figures from the runs of notebook 10: E1 (AnchorFormer vs DeiT, without and with "
    "distillation ⚗), E2 (the number of anchors M) and E3 (learned vs fixed anchors, with vs without "
    "Λ⁻¹, shared vs per-head anchors), each with params, GMACs, measured throughput, top-1 and top-5. "
    "The DeiT paper's ImageNet-1k numbers are shown beside ours; the AnchorFormer paper's tables are "
    "not public. The defaults are a smoke configuration that trains four tiny runs here in seconds; "
    "the DVC stage `cls-results` passes the folders of the real runs.",
    # parameters
    'out_dir = ""  # where the tables and figures go; empty: a temporary folder (smoke)\n'
    'e1_dirs = ""  # space-separated folders holding E1 run folders; empty: tiny runs trained here (smoke)\n'
    'e2_dirs = ""  # folders holding E2 run folders (the E1 AnchorFormer-T run is the default-M point)\n'
    'e3_dirs = ""  # folders holding E3 run folders (the E1 AnchorFormer-T run is the reference row)',
    [
        "import tempfile\n"
        "from pathlib import Path\n\n"
        "from IPython.display import Markdown, display\n\n"
        "from anchorformer.classification_results import (\n"
        "    e1_table,\n"
        "    e2_table,\n"
        "    e3_table,\n"
        "    load_runs,\n"
        "    plot_accuracy_vs_gmacs,\n"
        "    plot_anchor_ablation,\n"
        "    plot_design_ablation,\n"
        "    plot_training_curves,\n"
        "    tables_markdown,\n"
        "    write_results,\n"
        ")\n"
        "from anchorformer.data.synthetic import make_mini_imagenet\n"
        "from anchorformer.engine.classification import train_classification\n"
        "from anchorformer.viz import save_figure",
        'out_dir = out_dir or tempfile.mkdtemp(prefix="cls_results_smoke_")\n'
        "if not e1_dirs:  # smoke: one epoch of four tiny models on a tiny generated set\n"
        '    smoke = Path(out_dir) / "smoke"\n'
        '    data = smoke / "imagenet"\n'
        "    make_mini_imagenet(data, seed=0, train_per_class=4, val_per_class=2, img_size=40)\n"
        '    tiny = ["img_size=32", "patch_size=8", "model_sizes.tiny={embed_dim: 32, depth: 1, num_heads: 2}", "num_anchors=4",\n'
        '            "batch_size=8", "lr_batch=8", "warmup_epochs=0", "throughput_batch_size=2", "throughput_iters=1", "num_workers=0"]\n'
        '    for name in ("anchorformer_tiny_patch16_224", "deit_tiny_patch16_224"):\n'
        '        train_classification(data, smoke / "e1" / name, name, profile="mini", overrides=tiny, epochs=1)\n'
        '    train_classification(data, smoke / "e2" / "m2", "anchorformer_tiny_patch16_224", profile="mini", overrides=tiny + ["num_anchors=2"], epochs=1)\n'
        '    train_classification(data, smoke / "e3" / "fixed_anchors", "anchorformer_tiny_patch16_224", profile="mini", overrides=tiny + ["anchor_mode=pooled"], epochs=1)\n'
        '    e1_dirs, e2_dirs, e3_dirs = str(smoke / "e1"), str(smoke / "e2"), str(smoke / "e3")',
        "e1_runs = load_runs(e1_dirs.split())\n"
        "tables = {\n"
        '    "e1": e1_table(e1_runs),\n'
        '    "e2": e2_table(load_runs(e2_dirs.split()), baseline=e1_runs),\n'
        '    "e3": e3_table(load_runs(e3_dirs.split()), baseline=e1_runs),\n'
        "}\n"
        "paths = write_results(out_dir, tables)\n"
        "display(Markdown(tables_markdown(tables)))",
        "runs = [r for rows in tables.values() for r in rows]\n"
        'chance = 100.0 / max(load_runs(e1_dirs.split())[0]["num_classes"], 1)\n'
        "print(f\"{len(runs)} table rows; chance level {chance:.1f}% top-1; lowest top-1 {min(r['top1'] for r in runs):.1f}%\")",
        'save_figure(plot_accuracy_vs_gmacs(tables["e1"]), Path(out_dir) / "accuracy_vs_gmacs")\n'
        'save_figure(plot_anchor_ablation(tables["e2"]), Path(out_dir) / "anchors")\n'
        'save_figure(plot_design_ablation(tables["e3"]), Path(out_dir) / "ablations")\n'
        'save_figure(plot_training_curves(e1_runs, title="E1 training curves"), Path(out_dir) / "training_curves")',
    ],
)
