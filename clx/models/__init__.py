"""Models used by the published continual-learning benchmarks (Flax NNX), and their weights.

Turn one into a pure function with ``clx.FunctionalModel.from_module``. The
:class:`ViT` comes with :func:`save_params` / :func:`load_params` (orbax) and
:func:`from_safetensors` (hub weights with PyTorch names, :func:`hf_vit_name_map`, and
CLIP's vision tower with :func:`clip_vision_name_map`).
"""

from clx.models._cnn import AlexNet, BatchStatNorm, LeNet
from clx.models._mlp import MLP, TORCH_LINEAR_INIT, MultiHead
from clx.models._vit import (
    CLIP_NON_VISION,
    CONVERSIONS,
    ViT,
    clip_vision_name_map,
    from_safetensors,
    hf_vit_name_map,
    load_params,
    save_params,
)

__all__ = [
    "CLIP_NON_VISION",
    "CONVERSIONS",
    "MLP",
    "TORCH_LINEAR_INIT",
    "AlexNet",
    "BatchStatNorm",
    "LeNet",
    "MultiHead",
    "ViT",
    "clip_vision_name_map",
    "from_safetensors",
    "hf_vit_name_map",
    "load_params",
    "save_params",
]
