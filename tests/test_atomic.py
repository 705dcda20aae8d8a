"""densenet.utils.atomic: files are written with the modes the umask allows, as open() would write them:
a run's files and exports are readable by others under umask 022."""
from __future__ import annotations

import os
import stat

import pytest

from densenet.cli import main
from densenet.train import TrainConfig, fit

from helpers import SMALL


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, mask):
    from densenet.utils.atomic import write_text_atomic

    old = os.umask(mask)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        with open(tmp_path / "b.json", "w") as f:  # what open() gives, for comparison
            f.write("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE((tmp_path / "b.json").stat().st_mode)


def test_run_files_and_exports_are_readable_by_others_under_umask_022(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        fit(TrainConfig(model="densenet_bc_100_k12", model_args=SMALL, dataset="digits", epochs=1, batch_size=32,
                        train_subset=64, val_size=32, progress=False, tensorboard=False, out=str(out)))
        assert main(["export", str(out), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    finally:
        os.umask(old)
    files = [p for p in [*out.rglob("*"), tmp_path / "m.pt"] if p.is_file() and not p.is_symlink()]
    names = {p.name for p in files}
    assert {"config.json", "metrics.jsonl", "model.safetensors", "state.safetensors", "m.pt"} <= names
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {str(p): "0o644" for p in files}
