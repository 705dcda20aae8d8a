"""The commands of README.md and of the user guide (docs/*.md) run as written from a fresh clone, offline.

Every `$ densenet ...` line of a ```console block (and every `densenet ...` line of a ```bash block) of
README.md and of the guide's pages parses (no invented or misspelt options); the commands that need no
data run for real as written (models, profile, reproduce --dry-run); the first screen (install ->
trained model -> figure -> exported file), README's Deploy block and docs/deploy.md's, and every
```python block of README and the guide run for real in a fresh folder, the training shortened to one
epoch on 128 images. The first screen exactly as written (30 epochs: minutes on 2 CPU cores) is marked
`long`: `python -m pytest -m long` runs it, CI once. The full run (the default; -m "not slow" leaves it
out) also runs every distinct `$ ` line of README and then
of the guide's pages (in mkdocs.yml's order) in order, offline, with small stand-ins of the datasets
where the commands expect them (`~/data/...` in a temporary home); what each command gets appended to
fit in seconds is in `STAND_IN`. ```bash blocks (installs, the test commands) are not run."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densenet.cli import build_parser, main
from densenet.train import logs

from helpers import ENV, ROOT, make_cifar10, make_cifar_archive, make_folder, make_svhn

README = (ROOT / "README.md").read_text()


def guide_pages() -> list[Path]:
    """The user guide's pages in the order of mkdocs.yml's nav (docs/*.md that hold commands; the API
    reference holds none), then any page the nav leaves out (tests/test_docs.py fails on those)."""
    from helpers import nav_pages

    nav = [ROOT / "docs" / n for n in nav_pages()]
    rest = [p for p in sorted((ROOT / "docs").rglob("*.md")) if p not in nav]
    return [p for p in nav + rest if p.suffix == ".md" and p.is_file()]


GUIDE = {p.relative_to(ROOT).as_posix(): p.read_text() for p in guide_pages()}
TEXTS = {"README.md": README, **GUIDE}  # every text whose commands are checked, in reading order
SHORT_TRAIN = ["--epochs", "1", "--train-subset", "128", "--depth", "10", "--growth-rate", "6", "--no-progress"]


def console_commands(section: str | None = None, text: str = README) -> list[str]:
    """The `$ ` lines of a text's console blocks (continuation lines joined), of one `## ` section or all
    (README's by default)."""
    if section is not None:
        text = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("$ "):
                cmd = line[2:]
                while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
                commands.append(cmd)
            i += 1
    return commands


def densenet_argv(cmd: str) -> list[str] | None:
    """The arguments after `densenet` (or `python -m densenet`, `-m densenet.cli`), or None."""
    argv = shlex.split(cmd, comments=True)
    if argv[:1] == ["densenet"]:
        return argv[1:]
    for i, a in enumerate(argv[:-1]):
        if a == "-m" and argv[i + 1] in ("densenet", "densenet.cli"):
            return argv[i + 2:]
    return None


def bash_commands(text: str) -> list[str]:
    """The lines of a text's ```bash blocks that start with `densenet ` (they are shown, not run)."""
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
            for line in block.splitlines() if line.strip().startswith("densenet ")]


def all_console_commands() -> list[str]:
    """Every `$ ` line of README, then of the guide's pages in reading order, each once (a command
    repeated on a later page, e.g. the first run's, is the same command: run once)."""
    return list(dict.fromkeys(c for text in TEXTS.values() for c in console_commands(text=text)))


ALL = [c for c in all_console_commands() if densenet_argv(c) is not None]
SHOWN = list(dict.fromkeys(c for text in TEXTS.values() for c in bash_commands(text)))
FIRST_RUN = "First run"


def test_readme_has_the_first_screen_commands():
    first = console_commands(FIRST_RUN)
    assert [densenet_argv(c)[0] for c in first] == ["train", "eval", "reuse", "plot", "export"]
    assert console_commands(text=GUIDE["docs/first-run.md"]) == first  # the guide's page: the same screen
    assert len(ALL) >= 25
    # the guide holds what README lost: the training, analysis, cluster and deploy commands
    for page in ("docs/training.md", "docs/analyses.md", "docs/clusters.md", "docs/deploy.md", "docs/models.md"):
        assert any(densenet_argv(c) for c in console_commands(text=GUIDE[page])), page


@pytest.mark.parametrize("cmd", ALL + [c for c in SHOWN if c not in ALL])
def test_every_readme_command_parses(cmd, monkeypatch):
    monkeypatch.setattr(sys, "exit", lambda code=0: (_ for _ in ()).throw(AssertionError(f"exit {code}")))
    build_parser().parse_args(densenet_argv(cmd))  # argparse errors exit: a misspelt option fails here


# `models` and the table2 dry run (27 cells counted: half a minute) run in the slow test of every command
CHEAP = [c for c in ALL if densenet_argv(c)[0] == "profile" or "--dry-run" in c and "table2" not in c]


def python_blocks() -> list[tuple[str, str]]:
    """The ```python blocks of README and then of the guide's pages, in order: (where, code)."""
    return [(f"{name} python block {i + 1}", block) for name, text in TEXTS.items()
            for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S))]


def shell_expand(argv: list[str]) -> list[str]:
    """What bash does to README's words before `densenet` sees them: `~` at the start of a word or after
    the `=` of an assignment-like word (`cifar10=~/data/cifar`), and `$VAR`."""
    out = []
    for a in argv:
        a = os.path.expandvars(a)
        key, eq, value = a.partition("=")
        if a.startswith("~"):
            a = os.path.expanduser(a)
        elif eq and key.isidentifier() and value.startswith("~"):
            a = key + "=" + os.path.expanduser(value)
        out.append(a)
    return out


def _run(cmd: str, cwd: Path, shorten: bool, capsys, extra: list[str] | None = None) -> tuple[int, str]:
    """A README (or guide) line in `cwd`: densenet commands in this process (as `densenet`, without a new
    interpreter's start-up), other lines (torchrun, python -c, echo) by bash, as written; `extra` is appended."""
    argv = densenet_argv(cmd)
    if argv is None or cmd.split()[0] != "densenet":  # torchrun, python -c, echo: by the shell
        line = re.sub(r"\s#[^'\"]*$", "", cmd) + "".join(" " + shlex.quote(a) for a in extra) if extra else cmd
        env = {**os.environ, "PYTHONPATH": ENV["PYTHONPATH"], "OMP_NUM_THREADS": "1"}  # HOME as the test set it
        with subprocess.Popen(line, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, executable="/bin/bash", start_new_session=True) as proc:
            try:
                out, _ = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:  # torchrun's workers too: the whole process group
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                raise AssertionError(f"{cmd!r} ran for more than 300 s:\n{out[-3000:]}") from None
        return proc.returncode, out
    argv = shell_expand(argv) + (extra or [])
    if shorten and argv[0] == "train":
        argv = argv + SHORT_TRAIN
    old, said = os.getcwd(), logs._TB_MISSING_SAID
    os.chdir(cwd)
    logs._TB_MISSING_SAID = False  # as in the `densenet` process of its own that the line starts
    try:
        code = main(argv)
    finally:
        os.chdir(old)
        logs._TB_MISSING_SAID = said  # (its note "once per process" said: this process's flag as it was)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


@pytest.mark.parametrize("cmd", CHEAP)
def test_readme_commands_that_need_no_data_run_as_written(cmd, tmp_path, capsys):
    code, out = _run(cmd, tmp_path, False, capsys)
    assert code == 0, out
    assert out.strip()


def _first_screen_then_deploy(tmp_path: Path, shorten: bool, capsys) -> None:
    first = console_commands(FIRST_RUN)
    for cmd in first:
        code, out = _run(cmd, tmp_path, shorten, capsys)
        assert code == 0, (cmd, out)
    assert (tmp_path / "runs" / "digits" / "best" / "model.safetensors").is_file()
    assert {"reuse.png", "curves.png", "error_vs_params.png"} <= {p.name for p in (tmp_path / "figs").iterdir()}
    assert (tmp_path / "digits.onnx").stat().st_size > 10_000
    deploy = console_commands("Deploy") + console_commands(text=GUIDE["docs/deploy.md"])
    for cmd in dict.fromkeys(deploy):  # README's Deploy block, then the guide's Deploy page
        code, out = _run(cmd, tmp_path, shorten, capsys)
        argv = densenet_argv(cmd) or [""]
        failing_image = argv[0] == "predict" and ("corrupt.png" in argv or "." in argv)  # exit status 1, as said
        assert code == (1 if failing_image else 0), (cmd, out)
    assert (tmp_path / "digits.pt").is_file()


def _python_blocks_run(cwd: Path, monkeypatch) -> None:
    """Each ```python block of README and of the guide, in a fresh namespace, in `cwd` (a fresh clone's
    root: it holds hubconf.py and what the first screen and Deploy made), offline: torchvision's densenet121 file is a
    stand-in (random weights in its layout) where torchvision caches it, and the Hub is a local cache."""
    import torchvision

    import densenet

    (cwd / "hubconf.py").write_text((ROOT / "hubconf.py").read_text())  # `torch.hub.load(".", ...)`
    monkeypatch.setenv("TORCH_HOME", str(cwd / ".torch"))  # torch.hub.get_dir(): $TORCH_HOME/hub
    checkpoints = cwd / ".torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(torchvision.models.densenet121().state_dict(), checkpoints / "densenet121-a639ec97.pth")
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(logs, "_TB_MISSING_SAID", False)  # `fit` says its tensorboard note once per process
    blocks = python_blocks()
    assert len(blocks) >= 6 and sum(where.startswith("README.md") for where, _ in blocks) >= 4
    made = {}
    for where, block in blocks:
        namespace: dict = {}
        exec(compile(block, where, "exec"), namespace)
        made[where] = namespace
    loaded = [ns for where, ns in made.items() if "probs" in ns]  # README's densenet.load and docs/deploy.md's
    assert len(loaded) >= 2
    assert all(isinstance(ns["model"], densenet.DenseNet) and ns["probs"].shape == (1, 10) for ns in loaded)
    assert any(ns.get("embedding") is not None and ns["embedding"].shape == (1, 1024) for ns in made.values())
    assert any(ns.get("report", {}).get("parity", {}).get("ok") for ns in made.values())  # README's export


@pytest.mark.slow
def test_first_screen_deploy_and_python_blocks_run_in_a_fresh_folder(tmp_path, capsys, monkeypatch, offline_hub):
    _first_screen_then_deploy(tmp_path, shorten=True, capsys=capsys)
    _python_blocks_run(tmp_path, monkeypatch)
    assert [repo for repo, _ in offline_hub] == ["me/digits"]  # push_to_hub's upload, into the local Hub cache


@pytest.mark.long  # ~3 min: CI runs it once (python -m pytest -m long), not in each run of the suite
def test_first_screen_exactly_as_written(tmp_path, capsys):
    _first_screen_then_deploy(tmp_path, shorten=False, capsys=capsys)


# --- every README and guide command, in order, on stand-ins of the datasets ---------------------------------------

# Appended to README's and the guide's commands in the full run, and why (argparse: the last occurrence of an option wins).
TINY = ["--epochs", "1", "--val-size", "20", "--depth", "10", "--growth-rate", "6", "--no-progress"]
# torchrun's processes (8 in the guide, 2 in the test): batches of 16; 48 training, 24 val and 24 test images
IMAGENET_TINY = ["--epochs", "1", "--model-arg", "block_config=1,1,1,1", "--image-size", "32", "--resize", "36",
                 "--batch-size", "16", "--eval-batch-size", "16", "--workers", "0", "--no-progress"]


def stand_in(cmd: str) -> list[str]:
    """The options appended to a README or guide command so that it runs in seconds on the stand-ins."""
    argv = densenet_argv(cmd) or shlex.split(cmd)
    if "--resume" in argv:
        return ["--epochs", "2", "--no-progress"]  # one more epoch than the shortened run: it continues
    if "train" in argv and "imagenet" in argv:  # densenet121 on 224-pixel crops: one unit per block, 32 pixels
        return IMAGENET_TINY
    if argv[:1] == ["train"]:  # 300 (C10), 40 (SVHN) or 30 (digits) epochs, L=100: one epoch of L=10, k=6
        return TINY
    if argv[:2] == ["reproduce", "resnet-vs-densenet"]:  # six networks x 30 epochs: one small cell, 1 epoch
        return ["--only", "densenet_bc_100_k12/C10+", "--epochs", "1"]
    if argv[:1] == ["reproduce"] and "--launcher" in argv:  # needs a SLURM cluster: list what it would submit
        return ["--dry-run"]
    return []


def _stand_in_home(home: Path) -> None:
    """~/data as README's and the guide's commands expect it, with small stand-ins in the official formats."""
    make_cifar10(home / "data" / "cifar", per_batch=20, test=20)  # batches of 64 fit
    make_svhn(home / "data" / "svhn", train=60, extra=40, test=20)
    make_cifar_archive(home / "data" / "cifar10-train.tar.gz", per_class=10)
    make_folder(home / "data" / "imagenet", per_class=16, test_per_class=8, size=40, val=True)


@pytest.mark.slow
def test_every_readme_command_runs_offline_on_stand_ins(tmp_path, capsys, monkeypatch):
    """Every distinct `$ ` line of README and then of the guide's pages, in reading order, in a fresh
    folder (the clone's root) with a home whose ~/data holds stand-ins of CIFAR-10, SVHN, the CIFAR-10 image archive and an ImageNet folder.
    Offline: any URL opened fails the test. Not run here: `pip install -e` (the suite runs from it),
    `pytest` (this is it)."""
    import urllib.request

    import torchvision.datasets.cifar
    import torchvision.datasets.svhn

    home, cwd = tmp_path / "home", tmp_path / "clone"
    cwd.mkdir()
    _stand_in_home(home)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USER", "me")
    # the stand-ins are not the official files, whose md5 sums torchvision checks
    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn):
        monkeypatch.setattr(module, "check_integrity", lambda *a, **kw: True)

    def offline(*a, **kw):
        raise AssertionError(f"a README or guide command opened a URL: {a[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cluster = console_commands(text=GUIDE["docs/clusters.md"])
    for cmd in all_console_commands():
        if cmd.startswith("densenet reproduce status"):  # the SLURM grid was only listed (--dry-run):
            cmd = cmd.replace("/scratch/$USER/table2", "grid-rd")  # the status of the grid trained above
            assert cmd in [c.replace("/scratch/$USER/table2", "grid-rd") for c in cluster]
        argv = densenet_argv(cmd) or [""]
        # the guide's 8 processes, on 2 cores: 8 interpreters start for ~20 s; 2 run the same code
        cmd = cmd.replace("torchrun --nproc_per_node 8 ", "torchrun --nproc_per_node 2 ")
        code, out = _run(cmd, cwd, False, capsys, stand_in(cmd))
        failing_image = argv[0] == "predict" and ("corrupt.png" in argv or "." in argv)  # exit status 1, as said
        assert code == (1 if failing_image else 0), (cmd, out)
    for run in ("digits", "c10plus", "c10", "svhn", "c10-folder", "in1k", "c10-bc40-k12"):
        assert (cwd / "runs" / run / "last" / "model.safetensors").is_file(), run
    assert (cwd / "grid-rd" / "results.md").is_file() and (cwd / "docs" / "figures" / "c10-bc40-k12-reuse.png").is_file()
