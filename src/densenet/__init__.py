"""densenet: DenseNet (Huang et al., CVPR 2017) exactly as the paper specifies it."""
from .inference import load
from .models import DenseNet, DenseNetConfig
from .pretrained import create_transform, resolve_data_config
from .registry import ModelEntry, create_model, get_entry, list_models, register_model

__version__ = "0.1.0"
__all__ = ["DenseNet", "DenseNetConfig", "ModelEntry", "create_model", "create_transform", "get_entry",
           "list_models", "load", "register_model", "resolve_data_config", "__version__"]
