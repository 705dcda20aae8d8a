"""Shared fixtures. The whole suite runs on 2 CPU cores; tests make their own small data. Plain helpers
(data makers, a child process's environment, the fused-path comparisons) are in helpers.py: test
modules import from there, never from one another (tests/test_hygiene.py checks it)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# one thread per pytest-xdist worker (`-n 2` runs two workers on the 2 cores), else up to two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
os.environ.setdefault("DENSENET_DEBUG_FUSED", "1")  # the fused block checks its backward order (_fused.DEBUG)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_ARCHIVE = SHARED_DATA / "cifar10-train.tar.gz"


@pytest.fixture
def cifar_archive() -> Path:
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"the CIFAR-10 training archive is not at {CIFAR_ARCHIVE} (CI provides ../shared/data)")
    return CIFAR_ARCHIVE


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """One tiny trained run shared by the deployment tests (load, predict, export), which only read it:
    DenseNet-BC (L=10, k=6), 1 epoch on a 3-class folder of 12x12 images (12 train, 4 test per class)."""
    from helpers import make_folder, train

    root = tmp_path_factory.mktemp("tiny_run")
    folder = make_folder(root / "shapes", per_class=12, test_per_class=4, size=12)
    return {"folder": folder, "run": train(folder, root / "run")}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """huggingface_hub in offline mode over a cache directory; HfApi's uploads land in that cache, laid out
    as the Hub's (models--ORG--NAME/refs/main, snapshots/<commit>/...). Skips without huggingface_hub."""
    hf = pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as constants

    from helpers import HUB_COMMIT as COMMIT

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    uploads = []

    def create_repo(self, repo_id, **kw):
        return f"https://hub.invalid/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder_path, repo / "snapshots" / COMMIT, dirs_exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return f"https://hub.invalid/{repo_id}/commit/{COMMIT}"

    monkeypatch.setattr(hf.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hf.HfApi, "upload_folder", upload_folder)
    return uploads


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- device selection, markers and order ------------------------------------------------------------------
# `pytest --device cuda` (or DENSENET_TEST_DEVICE=cuda) runs the tests that take the `device` fixture on
# that device; tests marked `cuda` need a GPU and skip cleanly without one. Every other test runs by
# default; the heavy ones are marked `slow`, so that `-m "not slow"` is the quick subset. Heavy tests run
# first (the longest in LONGEST order): with pytest-xdist (`-n auto`) they then overlap the many short
# ones instead of ending the run alone. benchmarks/gpu_check.py runs the CUDA tests.

def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("DENSENET_TEST_DEVICE", "cpu"),
                     help="device for the tests that take the `device` fixture: cpu, cuda, cuda:1 "
                          "(default: $DENSENET_TEST_DEVICE or cpu)")
    parser.addoption("--run-slow", action="store_true",
                     help="accepted for old command lines: the slow tests run by default now "
                          "(-m 'not slow' leaves them out)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: a heavy test, over a few seconds on 2 CPU cores "
                                       "(-m 'not slow' leaves them out)")


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    for item in items:
        if "cuda" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
    # longest first (the classic rule for packing jobs onto two workers), then the other heavy ones, then
    # the rest as collected; with the longest last, one worker would finish the run alone for minutes
    items.sort(key=lambda item: (LONGEST.index(item.originalname) if item.originalname in LONGEST
                                 else len(LONGEST) + ("slow" not in item.keywords)))


# the tests over ~15 s on one core, longest first (`--durations` of a full run)
LONGEST = ("test_first_screen_exactly_as_written", "test_every_readme_command_runs_offline_on_stand_ins",
           "test_stored_counts_are_those_of_the_networks", "test_fuzz_each_mutation_in_its_own_process",
           "test_submitit_local_grid_with_a_killed_and_a_preempted_cell", "test_ray_grid_with_a_killed_cell")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device the model tests run on (--device / DENSENET_TEST_DEVICE); a test asking for an
    unavailable CUDA device skips."""
    name = request.config.getoption("--device")
    try:
        dev = torch.device(name)
    except RuntimeError:
        pytest.exit(f"--device {name!r} is not a device: use cpu, cuda or cuda:N", returncode=4)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda, but PyTorch sees no CUDA device")
    return dev


@pytest.fixture
def exact_cuda():
    """Float32 on a GPU as exact as on the CPU: no TF32 in matrix products and convolutions."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
