"""Source of notebooks/30_ade20k_segmentation.ipynb (run from the repository root to regenerate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_notebook import make_notebook  # noqa: E402

make_notebook(
    "notebooks/30_ade20k_segmentation.ipynb",
    "# 30 · ADE20K semantic segmentation (E6): train and evaluate one configuration\n\n"
    "A Semantic FPN or UperNet head over the shared simple feature pyramid of a plain AnchorFormer or "
    "DeiT backbone (`anchorformer.models.segmentation`), trained for a number of iterations with the "
    "recipe of `anchorformer/configs/seg.yaml` for the profile (AdamW, poly schedule, random rescale, "
    "crop and flip), then evaluated on the validation split with the ADE20K protocol: resize to fit the "
    "test scale, sliding windows, logits resized back to each label map, mIoU / mAcc / aAcc over the 150 "
    "classes (classes absent from both prediction and ground truth left out). GMACs are counted at 512² "
    "for backbone, pyramid and decode head. The defaults below are a seconds-long smoke configuration; "
    "the DVC stages `seg@*` pass the values of `params.yaml`.",
    # parameters (papermill reads one '=' per line: no '=' in the values or comments)
    'out_dir = ""  # the run folder; empty: a temporary folder (smoke)\n'
    'data = ""  # the ADEChallengeData2016 folder; empty: a small generated set (smoke)\n'
    'profile = "mini"  # recipe preset: mini | full\n'
    'backbone = "anchorformer_tiny_patch16_224"  # AnchorFormer variant or deit_* baseline\n'
    'head = "fpn"  # fpn (Semantic FPN) | upernet\n'
    "iters = 2  # training iterations; 0: from the profile\n"
    'init_checkpoint = ""  # E1 classification checkpoint (model.pth) for the backbone; empty: random init\n'
    'overrides = ""  # more recipe keys: semicolon-separated KEY-equals-VALUE items, as for --set\n'
    "smoke = 1  # 1: a two-block model on 64x64 crops, seconds on a CPU; the stages pass 0\n"
    "nproc = 1  # processes (GPUs); more than 1 runs under torchrun\n"
    "n_show = 4  # validation images in the figure",
    [
        "import json\n"
        "import tempfile\n"
        "from pathlib import Path\n\n"
        "from IPython.display import Image, Markdown, display\n\n"
        "from anchorformer.data.ade20k import ADE20K_CLASSES\n"
        "from anchorformer.data.synthetic import make_mini_ade20k\n"
        "from anchorformer.engine.seg_report import load_examples, load_runs, results_markdown\n"
        "from anchorformer.engine.segmentation import resolve_config, train_segmentation, train_segmentation_torchrun\n"
        "from anchorformer.report import markdown_table\n"
        "from anchorformer.viz import plot_segmentation, save_figure",
        'out_dir = out_dir or tempfile.mkdtemp(prefix="seg_smoke_")\n'
        "if not data:  # smoke: 8 training and 4 validation scenes\n"
        '    data = str(Path(out_dir) / "data" / "ADEChallengeData2016")\n'
        "    make_mini_ade20k(data, seed=0, num_train=8, num_val=4)\n"
        "sets = []\n"
        "if int(smoke):\n"
        '    sets += ["model_sizes.tiny={embed_dim: 32, depth: 2, num_heads: 2}", "model_sizes.small={embed_dim: 32, depth: 2, num_heads: 2}"]\n'
        '    sets += ["num_anchors=4", "pyramid_channels=16", "head_channels=16", "crop_size=64", "batch_size=2"]\n'
        '    sets += ["test_crop_size=64", "test_stride=48", "test_scale=[256, 64]", "warmup_iters=0", "log_every=1"]\n'
        "if init_checkpoint:\n"
        '    sets.append(f"init_checkpoint={init_checkpoint}")\n'
        'sets += [s.strip() for s in overrides.split(";") if s.strip()]\n'
        "cfg = resolve_config(profile, sets, backbone=backbone, head=head)\n"
        "print(backbone, head, profile, sets)",
        "#md ## Train, then evaluate on the validation split",
        "if int(nproc) > 1:\n"
        "    metrics = train_segmentation_torchrun(\n"
        "        data, out_dir, nproc_per_node=int(nproc), profile=profile, overrides=sets, backbone=backbone, head=head,\n"
        "        iters=int(iters) or None,\n"
        "    )\n"
        "else:\n"
        '    metrics = train_segmentation(data, out_dir, cfg, iters=int(iters) or None)["metrics"]\n'
        "print(json.dumps(metrics, indent=1))",
        "run = Path(out_dir)\n"
        "display(Markdown(results_markdown(load_runs(run.parent, [run.name]))))",
        "per_class = json.loads((run / 'per_class.json').read_text())\n"
        "display(Markdown(markdown_table([r for r in per_class if r['gt_pixels']], ['class', 'name', 'IoU', 'Acc', 'gt_pixels', 'pred_pixels'])))",
        "#md ## Predicted label maps on validation images",
        "ex = load_examples(data, run / 'predictions', int(n_show))\n"
        "fig = plot_segmentation(\n"
        "    ex['images'], ex['ground_truths'], ex['predictions'], ADE20K_CLASSES, titles=ex['names']\n"
        ")\n"
        "display(Image(filename=str(save_figure(fig, run / 'label_maps')[0])))",
    ],
)
