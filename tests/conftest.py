"""Shared fixtures. The whole suite runs on 2 CPU cores; tests make their own small data. Plain helpers
(data makers, a child process's environment, the fused-path comparisons) are in helpers.py: test
modules import from there, never from one another (tests/test_hygiene.py checks it)."""
from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

# helpers.py's checks (one_line_error, ...) fail with pytest's detailed messages, as asserts in a test do
pytest.register_assert_rewrite("helpers")

# one thread per pytest-xdist worker (`-n 2` runs two workers on the 2 cores), else up to two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
os.environ.setdefault("DENSENET_DEBUG_FUSED", "1")  # the fused block checks its backward order (fused/state.DEBUG)

# imported now (after the line above), so that the guard below knows their state before any test runs
import torch._dynamo.config  # noqa: E402  (2 s, once per process)
import torch._inductor.config  # noqa: E402

import densenet.cli  # noqa: E402,F401  (these 0.2 s: the modules with switches and tables tests may change)
import densenet.data  # noqa: E402,F401
import densenet.grid.reproduce  # noqa: E402,F401
import densenet.models._torch_compat  # noqa: E402,F401
import densenet.models.fused  # noqa: E402,F401
import densenet.recipes  # noqa: E402,F401
import densenet.registry  # noqa: E402,F401
import densenet.train.lock  # noqa: E402,F401
import densenet.train.logs  # noqa: E402,F401

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


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """A tiny image folder and a run of one epoch on it (3 steps), shared by the tests that copy it
    (helpers.copy_run) before they change it: DenseNet-BC (L=10, k=6) on a 3-class folder of 8x8 images
    (8 train, 2 test per class)."""
    from densenet.train import fit
    from helpers import cfg, make_folder

    root = tmp_path_factory.mktemp("tiny")
    folder = make_folder(root / "shapes", per_class=8, test_per_class=2, size=8)
    fit(cfg(folder, root / "run"))
    return {"folder": folder, "run": root / "run"}


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """The first run's recipe in miniature: digits, no augmentation, dropout 0.2 (the paper's rule).
    Shared by the tests of `densenet eval` and `densenet reuse`, which only read it."""
    from densenet.train import TrainConfig, fit
    from helpers import SMALL

    out = tmp_path_factory.mktemp("digits_run") / "digits"
    fit(TrainConfig(model="densenet_bc_100_k12", model_args=SMALL, dataset="digits", epochs=1, batch_size=32,
                    train_subset=128, val_size=32, augment="none", drop_rate=0.2, progress=False,
                    tensorboard=False, out=str(out)))
    return out


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


# --- process-global state: every test leaves it as it found it -------------------------------------------
# A test that changes a process-wide setting and leaves it changed makes the tests after it (in its
# worker) depend on the order they run in. The autouse guard below snapshots that state before each test
# and, after the test and its function-scoped fixtures (monkeypatch included) are torn down, fails the
# test that left any of it changed, naming what changed (and puts it back, so that only that test fails).
# Change such state through monkeypatch, a restoring context (torch._dynamo.config.patch(...),
# torch.device(...), torch.no_grad()), or try/finally. `--shuffle-seed N` runs the suite in another order.

_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_TORCH_STATE = (  # (what, read it, put it back)
    ("torch.get_num_threads()", torch.get_num_threads, torch.set_num_threads),
    ("torch.get_default_dtype()", torch.get_default_dtype, torch.set_default_dtype),
    ("torch.get_default_device()", torch.get_default_device, torch.set_default_device),
    ("torch.are_deterministic_algorithms_enabled()",
     lambda: (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
     lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1])),
    ("torch.is_grad_enabled()", torch.is_grad_enabled, torch.set_grad_enabled),
    ("torch.is_inference_mode_enabled()", torch.is_inference_mode_enabled, None),
    ("torch.is_anomaly_enabled()", torch.is_anomaly_enabled, torch.set_anomaly_enabled),
    ("torch.get_float32_matmul_precision()", torch.get_float32_matmul_precision,
     torch.set_float32_matmul_precision),
    *((f"torch.backends.cudnn.{flag}", lambda f=flag: getattr(torch.backends.cudnn, f),
       lambda v, f=flag: setattr(torch.backends.cudnn, f, v))
      for flag in ("enabled", "benchmark", "deterministic", "allow_tf32")),
    ("torch.backends.cuda.matmul.allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32,
     lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v)),
    ("torch.backends.mkldnn.enabled", lambda: torch.backends.mkldnn.enabled,
     lambda v: setattr(torch.backends.mkldnn, "enabled", v)),
    ("the working directory", os.getcwd, os.chdir),
)
_CONFIGS = (torch._dynamo.config, torch._inductor.config)
# set by pytest for every phase of every test, and by torch's inductor for itself (compiled kernels read
# _TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR when loaded; the C++ builder sets the other two)
# set by libraries for themselves on first import (pytest, inductor, scikit-learn's OpenMP set-up, ray), not by tests
_OWN_ENV = frozenset({"PYTEST_CURRENT_TEST", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "TORCH_WARM_POOL",
                      "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK", "CUDA_HOME", "RAY_CLIENT_MODE"})


def _shot(value, depth: int = 2):
    """(the object, its items to `depth` levels for a dict, list or set): mutated in place or replaced,
    either shows. Plain values compare by value, anything else by identity."""
    if depth and isinstance(value, dict):
        return value, {k: _shot(v, depth - 1) for k, v in value.items()}
    if depth and isinstance(value, (list, set)):
        return value, [_shot(v, depth - 1) for v in value]
    return value, None


def _same(a, b) -> bool:
    if not (a[0] is b[0] or (type(a[0]) in _PLAIN and type(a[0]) is type(b[0]) and a[0] == b[0])):
        return False
    if a[1] is None or b[1] is None:
        return a[1] is b[1]
    if isinstance(a[1], dict):
        return a[1].keys() == b[1].keys() and all(_same(v, b[1][k]) for k, v in a[1].items())
    return len(a[1]) == len(b[1]) and all(map(_same, a[1], b[1]))


def _put_back(shot):
    value, items = shot
    if isinstance(items, dict):
        old = {k: _put_back(v) for k, v in items.items()}
        value.clear()
        value.update(old)
    elif items is not None:
        old = [_put_back(v) for v in items]
        if isinstance(value, list):
            value[:] = old
        else:
            value.clear()
            value.update(old)
    return value


def _switches() -> dict:
    """The densenet modules' UPPERCASE globals (switches such as fused.state.DEBUG, FUSED_BY_DEVICE,
    ONEDNN_BACKWARD; tables such as registry._REGISTRY, data.DATASETS, cli.COMMANDS),
    of the modules imported so far."""
    global _MODULES
    if _MODULES[0] != len(sys.modules):  # a module imported (or removed) since the last look
        _MODULES = len(sys.modules), [n for n in list(sys.modules) if n == "densenet" or n.startswith("densenet.")]
    out = {}
    for name in _MODULES[1]:
        module = sys.modules.get(name)
        if module is not None:
            for attr, value in list(vars(module).items()):
                if attr.isupper() and not attr.startswith("__"):
                    out[name, attr] = _shot(value)
    return out


_MODULES: tuple[int, list[str]] = (0, [])  # (len(sys.modules) when listed, the densenet modules then)


def _snapshot() -> dict:
    return {"torch": [get() for _, get, _ in _TORCH_STATE],
            "configs": [c.get_config_copy() for c in _CONFIGS],
            "env": {k: v for k, v in os.environ.items() if k not in _OWN_ENV},
            "densenet": _switches()}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _changes_undone(before: dict) -> list[str]:
    """What differs from `before`, each put back as it was."""
    changed = []
    for (what, get, put), old in zip(_TORCH_STATE, before["torch"]):
        new = get()
        if new != old:
            changed.append(f"{what}: {_short(old)} -> {_short(new)}")
            if put is not None:
                put(old)
    for config, old in zip(_CONFIGS, before["configs"]):
        new = config.get_config_copy()
        if new != old:
            for key in sorted(k for k in old.keys() | new.keys() if old.get(k, None) != new.get(k, None)):
                changed.append(f"{config.__name__}.{key}: {_short(old.get(key))} -> {_short(new.get(key))}")
                if key in old:
                    setattr(config, key, old[key])
    env = {k: v for k, v in os.environ.items() if k not in _OWN_ENV}
    if env != before["env"]:
        for key in sorted(k for k in env.keys() | before["env"].keys() if env.get(k) != before["env"].get(k)):
            changed.append(f"os.environ[{key!r}]: {_short(before['env'].get(key))} -> {_short(env.get(key))}")
            if key in before["env"]:
                os.environ[key] = before["env"][key]
            else:
                del os.environ[key]
    now = _switches()
    for (module, attr), old in before["densenet"].items():
        new = now.get((module, attr))
        if new is not None and not _same(old, new):
            what = "changed in place" if new[0] is old[0] else f"{_short(old[0])} -> {_short(new[0])}"
            changed.append(f"{module}.{attr}: {what}")
            setattr(sys.modules[module], attr, _put_back(old))
    return changed


@pytest.fixture(autouse=True)
def _global_state_guard():
    """Fails the test that leaves process-global state changed (see above). An autouse fixture of the
    root conftest is set up before the fixtures a test asks for and torn down after them: monkeypatch
    has undone its changes by the time this compares."""
    before = _snapshot()
    yield
    changed = _changes_undone(before)
    if changed:
        pytest.fail("this test left process-global state changed (put back now; change it through monkeypatch "
                    "or a restoring context such as torch._dynamo.config.patch(...)):\n  "
                    + "\n  ".join(changed), pytrace=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- device selection, markers and order ------------------------------------------------------------------
# `pytest --device cuda` (or DENSENET_TEST_DEVICE=cuda) runs the tests that take the `device` fixture on
# that device; tests marked `cuda` need a GPU and skip cleanly without one. Every other test runs by
# default; the heavy ones are marked `slow`, so that `-m "not slow"` is the quick subset. Heavy tests run
# first (the longest in LONGEST order): with pytest-xdist (`-n auto`) they then overlap the many short
# ones instead of ending the run alone. `--shuffle-seed N` runs them in a shuffled order instead (.ci/run
# does both). benchmarks/gpu_check.py runs the CUDA tests.

def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("DENSENET_TEST_DEVICE", "cpu"),
                     help="device for the tests that take the `device` fixture: cpu, cuda, cuda:1 "
                          "(default: $DENSENET_TEST_DEVICE or cpu)")
    parser.addoption("--run-slow", action="store_true",
                     help="accepted for old command lines: the slow tests run by default now "
                          "(-m 'not slow' leaves them out)")
    parser.addoption("--shuffle-seed", type=int, default=None, metavar="N",
                     help="run the tests in an order shuffled with seed N (the same N, the same order: every "
                          "pytest-xdist worker collects the same), to show that no test depends on another's "
                          "leftovers; the header and the summary print N (default: the longest tests first)")


def pytest_report_header(config):
    seed = config.getoption("--shuffle-seed")
    if seed is None:
        return "test order: the longest first (--shuffle-seed N shuffles it)"
    return f"test order: shuffled, --shuffle-seed {seed}"


def pytest_terminal_summary(terminalreporter, config):
    # what the tests on the real SLURM cluster record (tests/test_slurm.py): the job ids sbatch gave, the
    # requeues; user_properties travel from pytest-xdist workers with their reports
    lines = [f"{r.nodeid.split('::')[-1]}: {v}" for reports in terminalreporter.stats.values() for r in reports
             if getattr(r, "when", None) == "call" for k, v in getattr(r, "user_properties", ()) if k == "slurm"]
    if lines:
        terminalreporter.section("SLURM jobs of these tests")
        for line in lines:
            terminalreporter.write_line(line)
    seed = config.getoption("--shuffle-seed")
    if seed is not None:
        terminalreporter.write_line(f"tests ran in the order of --shuffle-seed {seed} (the same option repeats it)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: a heavy test, over a few seconds on 2 CPU cores "
                                       "(-m 'not slow' leaves them out)")
    config.addinivalue_line("markers", "long: minutes on its own (the README's first screen exactly as written); skipped "
                                       "unless selected by name: python -m pytest -m long (CI runs it once)")
    config.addinivalue_line("markers", "slurm: runs on a real one-node SLURM cluster that tools/slurm/start-cluster.sh "
                                       "starts (skipped where it cannot: not root, packages missing); "
                                       "python -m pytest -m slurm -rs runs them alone")


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    long_selected = "long" in (config.getoption("markexpr") or "").replace("not long", "")
    for item in items:
        if "cuda" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "long" in item.keywords and not long_selected:  # the suite stays within minutes: CI runs these once
            item.add_marker(pytest.mark.skip(reason="minutes on its own: python -m pytest -m long runs it "
                                                    "(CI does, once)"))
    seed = config.getoption("--shuffle-seed")
    if seed is not None:  # a fixed seed: every xdist worker collects the same order, as xdist requires
        items.sort(key=lambda item: item.nodeid)  # whatever order collection gave: the seed alone decides
        random.Random(seed).shuffle(items)
        return
    # longest first (the classic rule for packing jobs onto two workers), then the other heavy ones, then
    # the rest as collected; with the longest last, one worker would finish the run alone for minutes
    items.sort(key=lambda item: (LONGEST.index(item.originalname) if item.originalname in LONGEST
                                 else len(LONGEST) + ("slow" not in item.keywords)))


# the tests over ~15 s on one core, longest first (`--durations` of a full run)
LONGEST = ("test_every_readme_command_runs_offline_on_stand_ins",
           "test_stored_counts_are_those_of_the_networks", "test_fuzz_each_mutation_in_its_own_process",
           "test_submitit_local_grid_with_a_killed_and_a_preempted_cell",
           "test_a_killed_node_fails_the_job_loudly_and_a_rerun_resumes", "test_ray_grid_with_a_killed_cell")


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
