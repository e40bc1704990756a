"""Source of notebooks/00_data.ipynb (run from the repository root to regenerate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_notebook import make_notebook  # noqa: E402

make_notebook(
    "notebooks/00_data.ipynb",
    "# 00 · Data: the mini sets, verification and manifests, samples of each dataset\n\n"
    "The `data` stage of the pipeline. In the `mini` profile it writes the three embedded datasets "
    "(ImageNet, COCO and ADE20K formats, `anchorformer.data.synthetic`) and verifies them; in the "
    "`full` profile it verifies the real datasets at the given roots against the released counts. "
    "Either way each dataset gets a manifest (counts and a hash of its file list) that DVC tracks. "
    "Then a few samples of each, read through the training loaders: classes, boxes and masks "
    "(dashed: crowd regions), label maps. The defaults below are a seconds-long smoke configuration; "
    "the DVC stage `data` passes the values of `params.yaml`.",
    # parameters
    'profile = "mini"  # mini: make and verify the embedded sets; full: verify the roots below\n'
    'out_dir = "outputs/data_smoke"  # manifests and figures\n'
    'mini_dir = "outputs/data_smoke/mini"  # where the mini sets are written (the stage: data/mini)\n'
    "seed = 0  # seed of the mini sets\n"
    'imagenet_root = ""  # full profile: ImageNet-1k root (train/, val/ in ImageFolder layout)\n'
    'coco_root = ""  # full profile: COCO 2017 root (annotations/, train2017/, val2017/)\n'
    'ade20k_root = ""  # full profile: the ADEChallengeData2016 folder\n'
    'on_bad = "fail"  # an image that does not decode: fail, or skip and list it in the manifest\n'
    "workers = 2  # decoding processes of the verification\n"
    "n_samples = 8  # images per figure",
    [
        "from pathlib import Path\n\n"
        "from IPython.display import Image, Markdown, display\n\n"
        "from anchorformer.data.preview import manifest_table, plot_ade20k_samples, plot_coco_samples, plot_imagenet_samples\n"
        "from anchorformer.data.stage import run_data_stage, stage_roots\n"
        "from anchorformer.viz import save_figure",
        "#md ## Make (mini) and verify",
        "manifests = run_data_stage(\n"
        "    profile,\n"
        "    mini_dir=mini_dir,\n"
        "    out_dir=out_dir,\n"
        "    seed=int(seed),\n"
        "    imagenet_root=imagenet_root,\n"
        "    coco_root=coco_root,\n"
        "    ade20k_root=ade20k_root,\n"
        "    on_bad=on_bad,\n"
        "    workers=int(workers),\n"
        ")\n"
        "display(Markdown(manifest_table(manifests)))",
        "# NBVAL_CHECK_OUTPUT\n# counts, sizes and file-list hashes: the same seed writes the same bytes\nprint(manifest_table(manifests))",
        "roots = stage_roots(profile, mini_dir, imagenet_root=imagenet_root, coco_root=coco_root, ade20k_root=ade20k_root)\n"
        "figures = Path(out_dir) / 'figures'\n"
        "roots",
        "#md ## ImageNet format: one row per class",
        "if roots['imagenet'] is not None:\n"
        "    fig = plot_imagenet_samples(roots['imagenet'], 'train', per_class=int(n_samples) // 2, seed=int(seed))\n"
        "    display(Image(filename=str(save_figure(fig, figures / 'imagenet_samples', formats=('png',))[0])))",
        "#md ## COCO format: masks, boxes (dashed: crowd), categories",
        "if roots['coco'] is not None:\n"
        "    fig = plot_coco_samples(roots['coco'], 'val', n=int(n_samples), seed=int(seed))\n"
        "    display(Image(filename=str(save_figure(fig, figures / 'coco_samples', formats=('png',))[0])))",
        "#md ## ADE20K format: images and label maps (0 = other, ignored in training)",
        "if roots['ade20k'] is not None:\n"
        "    fig = plot_ade20k_samples(roots['ade20k'], 'validation', n=max(1, int(n_samples) // 2), seed=int(seed))\n"
        "    display(Image(filename=str(save_figure(fig, figures / 'ade20k_samples', formats=('png',))[0])))",
    ],
)
