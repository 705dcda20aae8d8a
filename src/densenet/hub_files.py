"""Files of a Hugging Face Hub repository, or of a local folder in its layout, fetched through the
optional `huggingface_hub` library; and `load_from_hub`, which loads a repository's weights into a
model (what `create_model(name, pretrained="hf-hub:org/repo")` does). hub.py builds the rest of the
Hub API (save_pretrained, push_to_hub, from_pretrained) on these; this module needs no registry.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from .runs import MODEL_FILE

LIBRARY = "densenet-paper"


def _hf():
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError("the Hugging Face Hub needs the huggingface_hub package: "
                         "pip install 'densenet-paper[hub]'") from None
    return huggingface_hub


def _fetch(repo_id: str, filename: str, **kwargs: Any) -> Path:
    local = Path(repo_id).expanduser()
    if local.is_dir():  # a folder in the Hub's layout (save_pretrained, or a clone of the repository)
        if not (local / filename).is_file():
            raise ValueError(f"{local} has no {filename}: not a folder written by densenet.hub.save_pretrained")
        return local / filename
    hf = _hf()
    try:
        return Path(hf.hf_hub_download(repo_id, filename, library_name=LIBRARY, **kwargs))
    except Exception as e:  # the library's errors for a missing repo, file, network or token
        raise ValueError(f"could not get {filename} of {repo_id!r} from the Hugging Face Hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); check the "
                         f"name, your network (offline: HF_HUB_OFFLINE=1 reads the local cache) and, for a "
                         f"private repository, your token") from None


def load_from_hub(model: nn.Module, repo_id: str, *, reset_classifier: bool = False, **kwargs: Any) -> nn.Module:
    """Load a Hub repository's weights into `model` (create_model's `pretrained="hf-hub:org/repo"`)."""
    from .weights import load_pretrained

    return load_pretrained(model, _fetch(repo_id, MODEL_FILE, **kwargs), reset_classifier=reset_classifier)


__all__ = ["LIBRARY", "load_from_hub"]
