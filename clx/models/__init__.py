"""Models used by the published continual-learning benchmarks (Flax NNX), and their weights.

The convolutional ones (:class:`LeNet`, :class:`AlexNet`, :class:`ResNet18`) are those of the
gradient-projection papers. Turn one into a pure function with ``clx.FunctionalModel.from_module``. The
:class:`ViT` comes with :func:`save_params` / :func:`load_params` (orbax) and
:func:`from_safetensors` (hub weights with PyTorch names, :func:`hf_vit_name_map`, and
CLIP's vision tower with :func:`clip_vision_name_map`).
"""

from clx.models._cnn import AlexNet, BatchStatNorm, LeNet
from clx.models._mlp import MLP, TORCH_LINEAR_INIT, MultiHead
from clx.models._resnet import GPM_NUM_SAMPLES as RESNET18_GPM_NUM_SAMPLES
from clx.models._resnet import BasicBlock, ResNet18
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
    "RESNET18_GPM_NUM_SAMPLES",
    "TORCH_LINEAR_INIT",
    "AlexNet",
    "BasicBlock",
    "BatchStatNorm",
    "LeNet",
    "MultiHead",
    "ResNet18",
    "ViT",
    "clip_vision_name_map",
    "from_safetensors",
    "hf_vit_name_map",
    "load_params",
    "save_params",
]
