"""Source of notebooks/20_coco_detection.ipynb (run from the repository root to regenerate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_notebook import make_notebook  # noqa: E402

make_notebook(
    "notebooks/20_coco_detection.ipynb",
    "# 20 · COCO detection and instance segmentation (E5): train and evaluate one configuration\n\n"
    "Mask R-CNN over a plain AnchorFormer or DeiT backbone with ViTDet's simple feature pyramid "
    "(`anchorformer.models.detection`), trained with the recipe of `anchorformer/configs/det.yaml` "
    "for the profile and evaluated with pycocotools (box and mask AP). With `match_macs_of`, the "
    "input is scaled so that the backbone's GMACs at 1333x800 match those of the named backbone "
    '(the "comparable FLOPs" pairing). The defaults below are a seconds-long smoke configuration; '
    "the DVC stages `det@*` pass the values of `params.yaml`.",
    # parameters
    'profile = "mini"  # recipe preset of anchorformer/configs/det.yaml: mini | full\n'
    'data = "outputs/det_smoke/mini/coco"  # COCO root: annotations/, train2017/, val2017/\n'
    "make_mini = True  # smoke only: write the mini COCO set into `data` when it is missing\n"
    'out_dir = "outputs/det_smoke/anchorformer_t"  # the run folder\n'
    'backbone = "anchorformer_tiny_patch16_224"  # backbone model name\n'
    'match_macs_of = ""  # a backbone name: scale the input to its backbone GMACs at 1333x800\n'
    'backbone_checkpoint = ""  # E1 classification checkpoint for the backbone ("" = random init)\n'
    "overrides = (  # space-separated key=value recipe overrides (as --set)\n"
    '    "epochs=1 lr_steps=[1] max_train_images=8 max_eval_images=4 warmup_iters=2 "\n'
    '    "model_sizes.tiny.embed_dim=48 model_sizes.tiny.depth=2 num_anchors=8 out_channels=32 "\n'
    '    "representation_size=64 mask_head_layers=1 mask_head_channels=16 min_size=96 max_size=120"\n'
    ")\n"
    "nproc = 1  # processes (GPUs); > 1 trains under torchrun\n"
    "n_show = 8  # validation images in the figure\n"
    "score_thresh = 0.5  # detections drawn",
    [
        "import json\n"
        "from pathlib import Path\n\n"
        "from IPython.display import Image, Markdown, display\n\n"
        "from anchorformer.data.coco import CocoDetection\n"
        "from anchorformer.data.synthetic import make_mini_coco\n"
        "from anchorformer.engine.config import apply_overrides, load_profile\n"
        "from anchorformer.engine.detection import load_detector, predict, train_detection, train_detection_torchrun\n"
        "from anchorformer.engine.detection_report import load_runs, results_markdown\n"
        "from anchorformer.viz import plot_detections, save_figure",
        "root = Path(data)\n"
        "if make_mini and not (root / 'annotations').is_dir():\n"
        "    make_mini_coco(root)\n"
        "settings = [f'backbone={backbone}', f'match_macs_of={match_macs_of}', f'backbone_checkpoint={backbone_checkpoint}']\n"
        "settings += str(overrides).split()\n"
        "cfg = apply_overrides(load_profile('det', profile), settings)\n"
        "cfg",
        "#md ## Train, then evaluate on the validation split",
        "if int(nproc) > 1:\n"
        "    metrics = train_detection_torchrun(root, out_dir, nproc_per_node=int(nproc), profile=profile, overrides=settings)\n"
        "else:\n"
        "    metrics = train_detection(cfg, root, out_dir)\n"
        "print(json.dumps(metrics, indent=1))",
        "run = Path(out_dir)\ndisplay(Markdown(results_markdown(load_runs(run.parent, [run.name]), [])))",
        "#md ## Predicted boxes and masks on validation images",
        "model, state = load_detector(run / 'model.pth')\n"
        "val = CocoDetection(root, cfg['eval_split'])\n"
        "items = [val[i] for i in range(min(int(n_show), len(val)))]\n"
        "predictions = predict(model, [im for im, _ in items])\n"
        "fig = plot_detections(\n"
        "    [im for im, _ in items],\n"
        "    predictions,\n"
        "    val.class_names,\n"
        "    score_thresh=float(score_thresh),\n"
        "    titles=[f\"image {t['image_id']}: {len(t['labels'])} objects\" for _, t in items],\n"
        ")\n"
        "display(Image(filename=str(save_figure(fig, run / 'predictions')[0])))",
    ],
)
