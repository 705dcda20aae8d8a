"""Model families. Each module builds its networks from the paper's parts; registry.py names them.
The classes load on first use, so that importing one family (models.resnet) loads no other; each name
maps to the module that defines it."""
import importlib

_LAZY = {"DenseNet": ".densenet", "DenseNetConfig": ".densenet", "ResNet": ".resnet", "ResNetConfig": ".resnet",
         "reference_path": ".fused.policy"}

__all__ = ["DenseNet", "DenseNetConfig", "ResNet", "ResNetConfig", "reference_path"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
