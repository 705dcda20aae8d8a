"""What `densenet reuse` reads: the trained DenseNet of a checkpoint (a run directory or a model file of
this package, or a torchvision checkpoint with its registered name), refused if it is no DenseNet, and
a note where it was saved too early for its heatmap to show learned feature reuse. The analysis itself
is analysis/reuse.py (feature_reuse, save_reuse); the command line (cli.py) prints what this returns.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple


class ReuseInput(NamedTuple):
    model: Any  # the network (an nn.Module with a DenseNet's `config`)
    checkpoint: Any  # the checkpoint read (densenet.runs.Checkpoint: file, which, why, epoch)
    model_name: str  # the registered name
    note: str | None  # analysis.reuse.training_note: a warning for a barely trained checkpoint, or None


def load_for_reuse(checkpoint: str | Path, which: str | None = None, model: str | None = None,
                   on_read: Callable[[Any, str], None] | None = None) -> ReuseInput:
    """The DenseNet saved at `checkpoint` (`which`: a run directory's best or last; default: the one its
    protocol reports). `model`: the registered name, for a torchvision checkpoint; without it, a model
    file of this package. `on_read(checkpoint, model_name)` is called once the file is read, before the
    network is checked. Raises ValueError if the network is not a DenseNet."""
    from ..registry import create_model
    from ..runs import resolve_checkpoint
    from ..saved_model import load_model
    from .reuse import training_note

    if model:
        origin = resolve_checkpoint(checkpoint, which)
        network, name = create_model(model, pretrained=str(origin.file)), model
    else:
        network, info = load_model(checkpoint, which=which)
        origin, name = info["checkpoint"], info["model"]
    if on_read is not None:
        on_read(origin, name)
    if not hasattr(network, "config") or not hasattr(network.config, "growth_rate"):
        raise ValueError(f"feature reuse is defined for DenseNets; {checkpoint} holds a "
                         f"{getattr(network, 'model_name', type(network).__name__)}")
    return ReuseInput(network, origin, name, training_note(origin.epoch))
