"""Weights on the Hugging Face Hub: `push_to_hub`, `from_pretrained` and `create_model(name,
pretrained="hf-hub:org/repo")`, through the `huggingface_hub` library (optional:
`pip install "densenet-paper[hub]"`).

A repository holds what `save_pretrained` writes into a folder:
- `model.safetensors`: the weights, with this package's metadata (model name, arguments, classes,
  preprocessing), so `densenet.load`/`load_model` read the file alone;
- `config.json`: the same for people and other tools: {"architecture", "model_args", "num_classes",
  "classes", "preprocessing", "pretrained_cfg", "library"};
- `README.md`: a short model card.
Nothing is executed when loading: safetensors holds only tensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from .hub_files import LIBRARY, _fetch, _hf
from .runs import MODEL_FILE
from .utils.validate import read_json

CONFIG_FILE = "config.json"


def _describe(model: nn.Module, info: dict[str, Any] | None) -> dict[str, Any]:
    info = dict(info or {})
    name = info.get("model") or getattr(model, "model_name", None)
    args = info.get("model_args", getattr(model, "model_args", None))
    if not name or args is None:
        raise ValueError("save_pretrained needs a model built by densenet.create_model or densenet.load "
                         "(its registered name and arguments rebuild it)")
    return {"architecture": name, "model_args": args, "num_classes": model.num_classes,
            "classes": info.get("classes"), "preprocessing": info.get("preprocessing"),
            "pretrained_cfg": {k: v for k, v in (getattr(model, "pretrained_cfg", None) or {}).items()
                               if k not in ("url", "file")},
            "library": LIBRARY}


def save_pretrained(model: nn.Module | str | Path, directory: str | Path,
                    info: dict[str, Any] | None = None) -> Path:
    """Write the Hub layout (model.safetensors, config.json, README.md) into `directory`. `model` is a
    model of this package or a checkpoint path (a run directory: its best checkpoint)."""
    from .utils.atomic import write_text_atomic
    from .saved_model import load_model, save_model

    if isinstance(model, (str, Path)):
        model, info = load_model(model)
    config = _describe(model, info)
    directory = Path(directory)
    _check_own(directory)
    meta = {k: config[k] for k in ("model_args", "classes", "preprocessing") if config[k] is not None}
    save_model(model, directory / MODEL_FILE, meta)
    write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    write_text_atomic(directory / "README.md", _card(config))
    return directory


def _check_own(directory: Path) -> None:
    """Refuse a folder whose files are not a Hub export of ours (a run directory above all: its
    config.json is the training's), instead of overwriting them."""
    from .train.checkpoint import RUN_FILES

    cfg = directory / CONFIG_FILE
    try:
        ours = cfg.is_file() and read_json(cfg).get("library") == LIBRARY
    except (OSError, ValueError):
        ours = False
    if (directory / "last").exists() or (directory / "ckpt").exists() or (cfg.is_file() and not ours) \
            or (directory / "state.safetensors").exists() or (not ours and (directory / MODEL_FILE).exists()):
        raise ValueError(f"{directory} holds files that are not a Hub export of {LIBRARY} (e.g. a training "
                         f"run: {', '.join(RUN_FILES[:3])}); give an empty or new folder")


def _card(config: dict[str, Any]) -> str:
    name, args = config["architecture"], config["model_args"]
    return (f"---\nlibrary_name: {LIBRARY}\ntags:\n- image-classification\n- densenet\n---\n\n"
            f"# {name}\n\nWeights for `{name}` with arguments `{json.dumps(args)}`, written by "
            f"[densenet-paper](https://pypi.org/project/{LIBRARY}/) (DenseNet as Huang et al., CVPR 2017 "
            f"specify it).\n\n```python\nimport densenet\n\nmodel, info = densenet.hub.from_pretrained(\"ORG/REPO\")"
            f"\n# or the registered network with these weights:\nmodel = densenet.create_model(\"{name}\", "
            f"pretrained=\"hf-hub:ORG/REPO\", **{args!r})\n```\n")


def push_to_hub(model: nn.Module | str | Path, repo_id: str, *, info: dict[str, Any] | None = None,
                private: bool = False, token: str | None = None, revision: str | None = None,
                commit_message: str = "Upload densenet-paper weights") -> str:
    """Upload a model (or a checkpoint path) to the Hub repository `repo_id` ("org/name"), created if
    needed; returns the commit URL. Needs a network and a token (`hf auth login` or `token=`)."""
    import tempfile

    hf = _hf()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, info)
        api = hf.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return str(api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                     commit_message=commit_message))


def from_pretrained(repo_id: str, map_location: str = "cpu", **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, info) from a Hub repository ("org/name", or "hf-hub:org/name") or a local
    folder in its layout. `kwargs` go to huggingface_hub.hf_hub_download (revision, cache_dir,
    local_files_only, token)."""
    from .saved_model import load_model

    repo_id = repo_id[len("hf-hub:"):] if repo_id.startswith("hf-hub:") else repo_id
    return load_model(_fetch(repo_id, MODEL_FILE, **kwargs), map_location)


__all__ = ["from_pretrained", "push_to_hub", "save_pretrained"]
