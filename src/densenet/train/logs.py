"""What a run logs beside its checkpoints: metrics.jsonl (one row per epoch, written by RunDir),
metrics.csv (the same rows, for spreadsheets), and TensorBoard scalars grouped `train/`, `val/`, `test/`
with the run's settings as hparams.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from ..utils.validate import parse_json

_TB_MISSING_SAID = False


def clean_lr(lr: float) -> float:
    """0.1 * 0.1 * 0.1 is 0.0010000000000000002 in floating point: the rate as a person writes it."""
    return float(f"{lr:.12g}")


def tag(key: str) -> str:
    """A metrics row's key as a grouped TensorBoard tag: val_top1_error -> val/top1_error,
    train_loss -> train/loss, lr -> train/lr, images_per_s -> train/images_per_s."""
    for prefix in ("train", "val", "test"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"train/{key}"


def write_csv(run_path: str | Path) -> Path:
    """metrics.csv from metrics.jsonl (rewritten whole: a resumed run's truncated rows stay consistent);
    columns in first-seen order, empty where a row has no value."""
    from ..utils.atomic import write_text_atomic

    run_path = Path(run_path)
    f = run_path / "metrics.jsonl"
    rows = [parse_json(line, f"{f} line {i + 1}", dict) for i, line in enumerate(f.read_text().splitlines())
            if line.strip()]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(run_path / "metrics.csv", buf.getvalue())
    return run_path / "metrics.csv"


def summary_writer(log_dir: Path):
    """torch's SummaryWriter, or None (and a note on stderr, once per process) without tensorboard."""
    global _TB_MISSING_SAID
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _TB_MISSING_SAID:
            _TB_MISSING_SAID = True
            print("note: tensorboard is not installed, so this run writes no TensorBoard logs (metrics.jsonl and "
                  "metrics.csv have every number): pip install 'densenet-paper[tensorboard]', or pass "
                  "--no-tensorboard to silence this", file=sys.stderr)
        return None
    return SummaryWriter(str(log_dir))


def log_epoch(writer, row: dict[str, Any], epoch: int) -> None:
    for k, v in row.items():
        if k != "epoch":
            writer.add_scalar(tag(k), v, epoch)
    writer.flush()


def log_end(writer, config: dict[str, Any], summary: dict[str, Any]) -> None:
    """The test error as test/ scalars, and the run's settings beside its final numbers as hparams."""
    epoch = summary.get("epochs", 0)
    for k in ("test_top1_error", "test_top5_error"):
        if k in summary:
            writer.add_scalar(tag(k), summary[k], epoch)
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
               for k, v in config.items() if v is not None}
    metrics = {f"hparam/{tag(k)}": summary[k] for k in ("val_top1_error", "test_top1_error", "train_loss")
               if isinstance(summary.get(k), (int, float))}
    writer.add_hparams(hparams, metrics, run_name=".")
    writer.flush()


__all__ = ["clean_lr", "log_end", "log_epoch", "summary_writer", "tag", "write_csv"]
