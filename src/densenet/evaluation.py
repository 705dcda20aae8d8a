"""Evaluate a saved checkpoint (`densenet eval`): top-1 and top-5 error on a split of the dataset it was
trained on (or another), read and preprocessed as its training evaluated, optionally with ten crops or
after re-estimating the BN statistics on training images; `format_result` writes the outcome as the
command prints it.
"""
from __future__ import annotations

from pathlib import Path


class EvaluationError(ValueError):
    """A checkpoint and a dataset that cannot be evaluated together as asked; printed as one line."""


def evaluate_checkpoint(checkpoint: str | Path, *, split: str = "test", dataset: str | None = None,
                        data: str | None = None, which: str | None = None, ten_crop: bool = False,
                        recalibrate_bn: int | None = None, batch_size: int = 256, workers: int = 4,
                        device: str = "auto"):
    """Evaluate `checkpoint` (a run directory or a model.safetensors file) on `split` ("test", "val" or
    "train") of `dataset` at `data` (default: those the checkpoint was trained on).

    Returns (result, origin): result a JSON-able dict {"top1_error", "top5_error", "images", "loss",
    "split", "dataset", "ten_crop", "model", "checkpoint", "which", "epoch", "recalibrated_bn_images"};
    origin the checkpoint read (`densenet.runs.Checkpoint`: file, which, why, epoch). With
    `recalibrate_bn` N, the BN statistics are first re-estimated on N training images with dropout off
    (the checkpoint is not changed). Raises ValueError for a batch size under 1, workers under 0 or
    `recalibrate_bn` under 1, before reading anything."""
    if recalibrate_bn is not None and recalibrate_bn < 1:
        raise ValueError(f"--recalibrate-bn takes a number of training images >= 1, got {recalibrate_bn}")
    if batch_size < 1 or workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}")
    import dataclasses

    from .data import load_splits
    from .saved_model import load_model
    from .train.config import TrainConfig
    from .train.distributed import Distributed
    from .train.engine import evaluate, evaluation_batches, select_splits

    device = Distributed().device(device)
    model, info = load_model(checkpoint, device, which)
    if "preprocessing" not in info or "classes" not in info:
        raise EvaluationError(f"{checkpoint} holds no preprocessing or class names (it was not written by "
                              f"`densenet train`)")
    origin = info["checkpoint"]
    saved = info.get("config") or {}
    # the schedule is not needed to evaluate (and a 1-epoch run's resolved milestones include 0)
    cfg = TrainConfig.from_dict({k: v for k, v in saved.items()
                                 if k in {f.name for f in dataclasses.fields(TrainConfig)} and k != "milestones"})
    if dataset:
        cfg = dataclasses.replace(cfg, dataset=dataset, val_size=None if dataset != cfg.dataset else cfg.val_size)
    if data:
        cfg = dataclasses.replace(cfg, data=data)
    cfg = cfg.resolve()
    pre = info["preprocessing"]
    # the test split alone is read (and SVHN's extra images are not), unless BN statistics need training images
    test_only = split == "test" and not recalibrate_bn
    splits = load_splits(cfg.dataset, cfg.data, svhn_extra=cfg.svhn_extra and not test_only,
                         in_memory=pre["source"] == "memory", in_channels=pre["channels"],
                         only=("test",) if test_only else None)
    if len(splits.classes) != len(info["classes"]):
        raise EvaluationError(f"the checkpoint has {len(info['classes'])} classes, the dataset {len(splits.classes)}")
    if test_only:
        images, train, val = splits.test, None, None
    else:
        train, val, test = select_splits(cfg, splits)
        images = {"train": train, "val": val, "test": test}[split]
    if images is None:
        _no_split(cfg, split, test_only, val)
    batches = evaluation_batches(images, pre, batch_size, device, ten_crop=ten_crop, workers=workers,
                                 checkpoint_file=origin.file)
    recalibrated = None
    if recalibrate_bn:
        import torch

        from .train.recalibrate import recalibrate_bn as recalibrate

        g = torch.Generator().manual_seed(cfg.seed)  # a seeded sample of the training images, shuffled
        idx = torch.randperm(len(train), generator=g)[:recalibrate_bn]
        recalibrated = recalibrate(model, evaluation_batches(train.subset(idx), pre, batch_size, device,
                                                             workers=workers, checkpoint_file=origin.file))
    result = evaluate(model, batches)
    return {"top1_error": result["top1_error"], "top5_error": result["top5_error"], "images": result["images"],
            "loss": result["loss"], "split": split, "dataset": cfg.dataset, "ten_crop": ten_crop,
            "model": info["model"], "checkpoint": str(origin.file), "which": origin.which, "epoch": origin.epoch,
            "recalibrated_bn_images": recalibrated}, origin


def format_result(result: dict, read: str) -> str:
    """`densenet eval`'s two lines: `read` (what was read, cli.checkpoint_line) with a note where the BN
    statistics were re-estimated, then the errors of `result` (evaluate_checkpoint's)."""
    recalibrated = result["recalibrated_bn_images"]
    note = (f"; BN statistics re-estimated on {recalibrated} training images, dropout off (not the "
            f"paper's protocol)" if recalibrated else "")
    return (f"{read}{note}\n{result['model']} on {result['dataset']} {result['split']}"
            f"{' (10-crop)' if result['ten_crop'] else ''}: top-1 error {result['top1_error']:.2f}%, "
            f"top-5 error {result['top5_error']:.2f}% ({result['images']} images)")


def _no_split(cfg, split: str, test_only: bool, val) -> None:
    where = cfg.data or cfg.dataset
    if split == "test" and (test_only or val is not None and not cfg.val_size):
        raise EvaluationError(f"{where} has no test split (a folder needs a test/ folder); in ImageNet's layout "
                              f"(train/ and val/) the val/ folder is the evaluation split: use --split val")
    raise EvaluationError(f"{where} has no {split} split" +
                          (" (a folder needs test/ or val/)" if split == "test" else " (the run used --val-size 0)"))
