"""Model families. Each module builds its networks from the paper's parts; registry.py names them."""
from ._fused import reference_path
from .densenet import DenseNet, DenseNetConfig
from .residual import ResNet, ResNetConfig

__all__ = ["DenseNet", "DenseNetConfig", "ResNet", "ResNetConfig", "reference_path"]
