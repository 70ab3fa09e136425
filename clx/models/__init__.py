"""Models used by the published continual-learning benchmarks (Flax NNX).

Turn one into a pure function with ``clx.FunctionalModel.from_module``.
"""

from clx.models._cnn import AlexNet, BatchStatNorm, LeNet
from clx.models._mlp import MLP, TORCH_LINEAR_INIT, MultiHead

__all__ = ["MLP", "TORCH_LINEAR_INIT", "AlexNet", "BatchStatNorm", "LeNet", "MultiHead"]
