"""Source of notebooks/10_classification.ipynb (run from the repository root to regenerate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_notebook import make_notebook  # noqa: E402

make_notebook(
    "notebooks/10_classification.ipynb",
    "# 10 · Classification: train and evaluate one configuration (E1, E2, E3)\n\n"
    "Trains one model with the recipe of the chosen profile (`anchorformer/configs/cls.yaml`: the DeiT "
    "recipe in `full`, its scaled-down form on the embedded 10-class set in `mini`), evaluates top-1/top-5 "
    "after resize and centre crop, and records params, GMACs and measured throughput. The same function "
    "backs `anchorformer train cls`; with `nproc > 1` the notebook launches it under `torchrun`. The "
    "defaults below are a seconds-long smoke configuration on a tiny generated set; the DVC stages "
    "`cls-teacher`, `cls-e1`, `cls-e1-distilled`, `cls-e2` and `cls-e3` pass the values of `params.yaml`.",
    # parameters (papermill reads one '=' per line: no '=' in the values or comments)
    'out_dir = ""  # the run folder; empty: a temporary folder (smoke)\n'
    'data = ""  # ImageFolder root with train/ and val/; empty: a tiny generated set (smoke)\n'
    'model = "anchorformer_tiny_patch16_224"  # AnchorFormer variant, deit_* baseline or any timm model\n'
    'profile = "mini"  # recipe preset: mini | full\n'
    "epochs = 1  # 0: from the profile\n"
    "num_anchors = 0  # M for AnchorFormer models; 0: from the profile\n"
    'teacher = ""  # distillation teacher: a timm name or the model.pth of a teacher run; empty: from the profile\n'
    'overrides = ""  # more recipe keys: semicolon-separated KEY-equals-VALUE items, as for --set\n'
    "smoke = 1  # 1: a one-block model on 32x32 images, seconds on a CPU; the stages pass 0\n"
    "nproc = 1  # processes (GPUs); more than 1 runs under torchrun",
    [
        "import tempfile\n"
        "from pathlib import Path\n\n"
        "from IPython.display import Markdown, display\n\n"
        "from anchorformer.classification_results import load_runs, plot_training_curves\n"
        "from anchorformer.data.synthetic import make_mini_imagenet\n"
        "from anchorformer.engine.classification import train_classification, train_classification_torchrun\n"
        "from anchorformer.report import markdown_table\n"
        "from anchorformer.viz import save_figure",
        'out_dir = out_dir or tempfile.mkdtemp(prefix="cls_smoke_")\n'
        "if not data:  # smoke: 10 classes x 4 training images\n"
        '    data = str(Path(out_dir) / "data" / "imagenet")\n'
        "    make_mini_imagenet(data, seed=0, train_per_class=4, val_per_class=2, img_size=40)\n"
        "sets = []\n"
        "if int(smoke):\n"
        '    sets += ["img_size=32", "patch_size=8", "model_sizes.tiny={embed_dim: 32, depth: 1, num_heads: 2}", "num_anchors=4"]\n'
        '    sets += ["batch_size=8", "lr_batch=8", "warmup_epochs=0", "throughput_batch_size=2", "throughput_iters=1", "num_workers=0"]\n'
        'sets += [s.strip() for s in overrides.split(";") if s.strip()]\n'
        "if int(num_anchors):\n"
        '    sets.append(f"num_anchors={int(num_anchors)}")\n'
        "if teacher:\n"
        '    sets.append(f"teacher={teacher}")\n'
        "print(model, profile, sets)",
        "kwargs = dict(profile=profile, overrides=sets, epochs=int(epochs) or None)\n"
        "if int(nproc) > 1:\n"
        "    metrics = train_classification_torchrun(data, out_dir, model, nproc_per_node=int(nproc), **kwargs)\n"
        "else:\n"
        "    metrics = train_classification(data, out_dir, model, **kwargs)",
        'columns = ["model", "distillation", "num_anchors", "params_m", "gmacs", "throughput", "top1", "top5", "loss", "epochs", "train_time_s"]\n'
        "display(Markdown(markdown_table([metrics], columns)))",
        "fig = plot_training_curves(load_runs([out_dir]), title=model)\n"
        'save_figure(fig, Path(out_dir) / "training_curves")',
    ],
)
