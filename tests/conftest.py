"""Shared fixtures. The whole suite runs on 2 CPU cores; tests make their own small data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_ARCHIVE = SHARED_DATA / "cifar10-train.tar.gz"


@pytest.fixture
def cifar_archive() -> Path:
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"the CIFAR-10 training archive is not at {CIFAR_ARCHIVE} (CI provides ../shared/data)")
    return CIFAR_ARCHIVE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
