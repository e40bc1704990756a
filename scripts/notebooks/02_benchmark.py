"""Source of notebooks/02_benchmark.ipynb (run from the repository root to regenerate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_notebook import make_notebook  # noqa: E402

make_notebook(
    "notebooks/02_benchmark.ipynb",
    "# 02 · Benchmarks: anchor attention and whole models, time and memory (E4, measured)\n\n"
    "The operator forward and forward+backward against the token count N: the fused Triton kernels "
    "(CUDA), the PyTorch reference eagerly and under `torch.compile`, and softmax attention "
    "(`scaled_dot_product_attention`) at the same shapes. Then images/s of AnchorFormer and DeiT "
    "(T and S) for inference and a training step at several image sizes, and the targets as "
    "measured ratios. Presets: `anchorformer/configs/bench.yaml` (`mini`: a CPU in minutes; `full`: "
    "one GPU). The defaults below are a seconds-long smoke configuration; the DVC stage `bench` "
    "passes the values of `params.yaml`.",
    # parameters
    'out_dir = "outputs/smoke/bench"  # where the JSON, markdown and figures go\n'
    'profile = "mini"  # preset: mini (CPU) or full (GPU)\n'
    'device = "auto"  # auto (CUDA when present), cpu or cuda\n'
    "# preset overrides, space-separated key=value (values in YAML)\n"
    'overrides = "op_tokens=[64,256] op_impls=[fused,reference,sdpa] model_sizes=[tiny] model_img_sizes=[64] '
    'model_train_img_sizes=[64] warmup=1 repeats=2 budget_s=0.2"',
    [
        "from pathlib import Path\n\n"
        "from IPython.display import Image, Markdown, display\n\n"
        "from anchorformer.bench import bench_config, results_markdown, run_benchmarks",
        "cfg = bench_config(profile, overrides)\ncfg",
        "results = run_benchmarks(out_dir, cfg, device=device)\nresults['environment']",
        "#md ## Results\n\nTimes are medians; `peak / io` is the peak of allocated memory over the inputs "
        "and outputs of the call; GB/s is the DRAM traffic of the call over its time (for the fused "
        "kernels, the traffic they actually make).",
        "display(Markdown(results_markdown(results)))",
        "#md ## Operator: time and peak memory against N",
        "display(Image(filename=str(Path(out_dir) / 'bench_operator.png')))",
        "#md ## Whole models: images/s against image side",
        "display(Image(filename=str(Path(out_dir) / 'bench_models.png')))",
    ],
)
