"""torch.hub entry points: `torch.hub.load(repo_or_dir, "densenet_bc_100_k12", source="local")`, one per
registered network (`torch.hub.list` names them), each taking create_model's arguments
(`pretrained=`, `num_classes=`, `in_chans=`, the paper's options)."""
import os
import sys

dependencies = ["torch", "torchvision", "safetensors"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if _SRC not in sys.path:  # this checkout's package, whether or not it is installed
    sys.path.insert(0, _SRC)

from densenet.registry import create_model as _create_model  # noqa: E402
from densenet.registry import get_entry as _get_entry, list_models as _list_models  # noqa: E402


def _entrypoint(name):
    def build(pretrained=False, **kwargs):
        return _create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{_get_entry(name).description}. Arguments: those of densenet.create_model."
    return build


for _name in _list_models():
    globals()[_name] = _entrypoint(_name)
