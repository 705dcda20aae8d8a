"""densenet: DenseNet (Huang et al., CVPR 2017) exactly as the paper specifies it."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Imported on first use (PEP 562), so that `densenet --help` and `--version` start without torch. Each name
# maps to the module that defines it (tests/test_layering.py checks): a lazy import, never an old path.
_LAZY = {"load": ".inference", "DenseNet": ".models.densenet", "DenseNetConfig": ".models.densenet",
         "ModelEntry": ".registry", "create_model": ".registry", "get_entry": ".registry",
         "list_models": ".registry", "register_model": ".registry", "create_transform": ".pretrained",
         "resolve_data_config": ".pretrained", "optimize": ".compiled"}
_SUBMODULES = {"analysis", "cli", "compiled", "data", "export", "grid", "hub", "inference", "models", "paper", "pretrained",
               "recipes", "registry", "saved_model", "train", "utils", "weights"}
__all__ = ["DenseNet", "DenseNetConfig", "ModelEntry", "create_model", "create_transform", "get_entry",
           "list_models", "load", "optimize", "register_model", "resolve_data_config", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:  # `import densenet; densenet.registry.list_models()`: the submodule itself
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
