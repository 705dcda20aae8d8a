"""Every environment variable the package reads, read here and nowhere else.

| variable | default | what it does |
|---|---|---|
| `DENSENET_DEBUG` | off | `densenet` prints the traceback of an error instead of one line (as `--debug`) |
| `DENSENET_DEBUG_FUSED` | off | the fused dense block checks the backward order it relies on (tests turn it on) |
| `DENSENET_ONEDNN_BACKWARD` | on | the fused block's 1x1 backward products in oneDNN (CPU, float32); `0`: torch.mm |
| `DENSENET_MAX_MEMORY_MB` | half the machine's memory | the most a dataset may decode into memory |
| `DENSENET_MAX_FILE_MB` | 64 | the largest image file read |
| `DENSENET_MAX_IMAGE_PIXELS` | 89,478,485 (Pillow's) | the most pixels one image may have |

The switches are read once, when the module that uses them is imported (`fused.state.DEBUG`,
`fused.kernels.ONEDNN_BACKWARD`: module attributes, so a program or a test can also set them). torchrun's
`RANK`, `WORLD_SIZE`, `LOCAL_RANK` are torchrun's protocol, read by `train.distributed`, and
`DENSENET_LOCK_HANDOVER` is the run lock's own parent-to-child protocol (`train.lock`), not an option.
"""
from __future__ import annotations

import os

DOCUMENTED = ("DENSENET_DEBUG", "DENSENET_DEBUG_FUSED", "DENSENET_ONEDNN_BACKWARD", "DENSENET_MAX_MEMORY_MB",
              "DENSENET_MAX_FILE_MB", "DENSENET_MAX_IMAGE_PIXELS")


def flag(name: str, default: bool) -> bool:
    """An on/off variable: unset is `default`; empty or "0" is off; anything else is on."""
    if name not in DOCUMENTED:
        raise KeyError(f"{name} is not one of densenet.options.DOCUMENTED")
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip() not in ("", "0")


def text(name: str) -> str | None:
    """A variable's value as given (None when unset)."""
    if name not in DOCUMENTED:
        raise KeyError(f"{name} is not one of densenet.options.DOCUMENTED")
    return os.environ.get(name)
