"""Model families. Each module builds its networks from the paper's parts; registry.py names them.
The classes load on first use, so that importing one family (models.resnet) loads no other; each name
maps to the module that defines it. torchvision's API: `densenet121(*, weights=None, progress=True)`,
densenet161/169/201 (and 264) with their Weights enums (`DenseNet121_Weights.IMAGENET1K_V1`), in builders."""
import importlib

_LAZY = {"DenseNet": ".densenet", "DenseNetConfig": ".densenet", "ResNet": ".resnet", "ResNetConfig": ".resnet",
         "reference_path": ".fused.policy",
         "densenet121": ".builders", "densenet161": ".builders", "densenet169": ".builders",
         "densenet201": ".builders", "densenet264": ".builders", "DenseNet121_Weights": ".builders",
         "DenseNet161_Weights": ".builders", "DenseNet169_Weights": ".builders", "DenseNet201_Weights": ".builders"}

__all__ = ["DenseNet", "DenseNetConfig", "ResNet", "ResNetConfig", "reference_path",
           "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
           "DenseNet121_Weights", "DenseNet161_Weights", "DenseNet169_Weights", "DenseNet201_Weights"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
