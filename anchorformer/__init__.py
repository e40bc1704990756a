"""AnchorFormer: differentiable anchor attention for efficient vision transformers.

Reference implementation of Shan et al., Pattern Recognition Letters 197 (2025),
arXiv 2505.16463. Importing the package registers the models in timm's registry.
"""

from __future__ import annotations

from .console import show_log_in_kernel
from .models import AnchorAttention, AnchorFormer, AnchorFormerDistilled, create_model, load_checkpoint
from .ops import anchor_attention
from .ops.counting import count_macs

__version__ = "0.1.0"

show_log_in_kernel()  # in JupyterLab, the log (epochs, losses, evaluation) shows in the cell's output

__all__ = [
    "AnchorAttention",
    "AnchorFormer",
    "AnchorFormerDistilled",
    "__version__",
    "anchor_attention",
    "count_macs",
    "create_model",
    "load_checkpoint",
]
