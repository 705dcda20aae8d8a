"""densenet.train.logs: metrics.csv beside metrics.jsonl, TensorBoard tags grouped by split, hparams,
learning rates without float noise, and a missing tensorboard said once."""
from __future__ import annotations

import json

from densenet.train import TrainConfig, fit

from helpers import SMALL


class FakeWriter:
    def __init__(self):
        self.scalars, self.hparams, self.closed = {}, None, False

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def add_hparams(self, hparams, metrics, run_name=None):
        self.hparams = (hparams, metrics)

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_logs_csv_grouped_tensorboard_tags_hparams_and_clean_lr(tmp_path, monkeypatch):
    from densenet.train import logs

    writers = []
    monkeypatch.setattr(logs, "summary_writer", lambda d: writers.append(FakeWriter()) or writers[-1])
    out = tmp_path / "run"
    fit(TrainConfig(model="densenet_bc_100_k12", model_args=SMALL, dataset="digits", epochs=3, milestones=(1, 2),
                    batch_size=32, train_subset=64, val_size=32, progress=False, out=str(out)))
    text = (out / "metrics.jsonl").read_text()
    rows = [json.loads(r) for r in text.splitlines()]
    assert [r["lr"] for r in rows] == [0.1, 0.01, 0.001] and '"lr": 0.001,' in text  # not 0.0010000000000000002
    import csv

    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in table] == [0.1, 0.01, 0.001] and list(table[0]) == list(rows[0])
    assert [float(r["val_top1_error"]) for r in table] == [r["val_top1_error"] for r in rows]
    (w,) = writers
    assert {"train/loss", "train/error", "train/lr", "val/top1_error", "val/loss", "test/top1_error"} <= set(w.scalars)
    assert not any("_" in t.split("/")[0] or "/" not in t for t in w.scalars)
    assert w.scalars["train/lr"] == [(1, 0.1), (2, 0.01), (3, 0.001)]
    hp, metrics = w.hparams
    assert hp["model"] == "densenet_bc_100_k12" and hp["epochs"] == 3 and hp["model_args"] == json.dumps(SMALL)
    assert set(metrics) == {"hparam/val/top1_error", "hparam/test/top1_error", "hparam/train/loss"} and w.closed


def test_missing_tensorboard_is_said_once(monkeypatch, capsys, tmp_path):
    import sys

    from densenet.train import logs

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    monkeypatch.setattr(logs, "_TB_MISSING_SAID", False)
    assert logs.summary_writer(tmp_path) is None and logs.summary_writer(tmp_path) is None
    err = capsys.readouterr().err
    assert err.count("tensorboard is not installed") == 1 and "--no-tensorboard" in err
    assert "densenet-paper[tensorboard]" in err
