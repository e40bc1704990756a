"""Source of notebooks/40_anchor_maps.ipynb (run from the repository root to regenerate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_notebook import make_notebook  # noqa: E402

make_notebook(
    "notebooks/40_anchor_maps.ipynb",
    "# 40 · Anchor maps (E7): what the anchors learned to gather\n\n"
    "For an AnchorFormer, each layer's operator gives p(anchor | token), the rows of A. With a "
    "uniform prior over tokens, p(token | anchor) = A[token, anchor] / deg(anchor): where each "
    "anchor gathers the values it passes on. We show it as heat maps over mini validation images "
    "and over real photographs shipped with scikit-image, for the anchors of largest degree.\n\n"
    "Defaults are a smoke configuration (an untrained model); the DVC stage passes the E1 "
    "checkpoint of AnchorFormer-T.",
    'checkpoint = ""  # model.pth written by `anchorformer train cls`; empty: an untrained model\n'
    'smoke_model = "anchorformer_tiny_patch16_224"  # used only without a checkpoint\n'
    "smoke_img_size = 64  # used only without a checkpoint\n"
    'data = ""  # an ImageFolder root (its val/ split) for mini images; empty: photographs only\n'
    "images_per_source = 2  # mini validation images shown\n"
    'photos = "astronaut coffee chelsea"  # skimage.data photographs\n'
    'layers = "0 -1"  # block indices (negative from the end)\n'
    "anchors_shown = 4  # anchors of largest degree per image and layer\n"
    'out_dir = "outputs/smoke/anchor_maps"',
    [
        "import json\nfrom pathlib import Path\n\nimport numpy as np\nfrom PIL import Image\n\n"
        "import anchorformer\n"
        "from anchorformer.models import model_from_checkpoint\n"
        "from anchorformer.viz import compute_anchor_maps, images_to_tensor, plot_anchor_maps, real_photographs, save_figure",
        "if checkpoint:\n"
        "    model, meta = model_from_checkpoint(checkpoint)\n"
        "    source = f\"{meta['model_name']} from {checkpoint}\"\n"
        "else:\n"
        "    model = anchorformer.create_model(smoke_model, img_size=smoke_img_size, depth=4, num_anchors=8).eval()\n"
        "    source = f'{smoke_model} (untrained, smoke)'\n"
        "img_size = model.patch_embed.img_size[0]\n"
        "mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']\n"
        "depth = len(model.blocks)\n"
        "layer_ids = sorted({int(i) % depth for i in str(layers).split()})\n"
        "print(source, '| input', img_size, '| layers', layer_ids)",
        "sources = {}\n"
        "if data:\n"
        "    val = Path(data) / 'val'\n"
        "    for cls_dir in sorted(p for p in val.iterdir() if p.is_dir())[: int(images_per_source)]:\n"
        "        first = sorted(cls_dir.iterdir())[0]\n"
        "        sources[f'{cls_dir.name}/{first.name}'] = np.array(Image.open(first).convert('RGB'))\n"
        "sources.update(real_photographs(str(photos).split()))\n"
        "x, shown = images_to_tensor(list(sources.values()), img_size, mean, std)\n"
        "maps = compute_anchor_maps(model, x, layers=layer_ids)",
        "fig = plot_anchor_maps(shown, maps, layer_ids, int(anchors_shown), list(sources))\n"
        "paths = save_figure(fig, Path(out_dir) / 'anchor_maps')\n"
        "summary = {\n"
        "    'source': source,\n"
        "    'images': list(sources),\n"
        "    'layers': layer_ids,\n"
        "    # how concentrated each anchor's gathering is: entropy of p(token | anchor), in nats\n"
        "    'mean_entropy': {\n"
        "        str(i): float(-(maps[i].flatten(2).clamp_min(1e-12).log() * maps[i].flatten(2)).sum(-1).mean())\n"
        "        for i in layer_ids\n"
        "    },\n"
        "}\n"
        "(Path(out_dir) / 'anchor_maps.json').write_text(json.dumps(summary, indent=2) + '\\n')\n"
        "summary",
        "from IPython.display import Image as Show\n\nShow(filename=str(paths[0]))",
    ],
)
