"""Models: AnchorFormer backbones (registered in timm) and their weight loading."""

from .anchorformer import (
    ANCHOR_MODES,
    DEFAULT_NUM_ANCHORS,
    MODEL_NAMES,
    AnchorAttention,
    AnchorBlock,
    AnchorFormer,
    AnchorFormerDistilled,
)
from .checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    checkpoint_filter_fn,
    load_checkpoint,
    model_from_checkpoint,
    read_state_dict,
    safetensors_beside,
    save_safetensors,
)
from .factory import backbone_kwargs, create_model
from .fused import FusedAnchorAttention
from .peers import PEER_FAMILIES, PEER_MODEL_NAMES, is_peer, peer_family

__all__ = [
    "ANCHOR_MODES",
    "DEFAULT_NUM_ANCHORS",
    "MODEL_NAMES",
    "PEER_FAMILIES",
    "PEER_MODEL_NAMES",
    "AnchorAttention",
    "AnchorBlock",
    "AnchorFormer",
    "AnchorFormerDistilled",
    "CheckpointMismatchError",
    "FusedAnchorAttention",
    "LoadReport",
    "backbone_kwargs",
    "checkpoint_filter_fn",
    "create_model",
    "is_peer",
    "load_checkpoint",
    "model_from_checkpoint",
    "peer_family",
    "read_state_dict",
    "safetensors_beside",
    "save_safetensors",
]
