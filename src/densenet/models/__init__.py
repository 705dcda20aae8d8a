"""Model families. Each module builds its networks from the paper's parts; registry.py names them."""
from .densenet import DenseNet, DenseNetConfig
from .resnet import ResNet, ResNetConfig

__all__ = ["DenseNet", "DenseNetConfig", "ResNet", "ResNetConfig"]
