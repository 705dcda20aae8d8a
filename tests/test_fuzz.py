"""Fuzzing (hypothesis): any command line and any config file either works or ends in a clear error
with a non-zero exit status, never a traceback.

The command line is called in-process (`densenet.cli.main(argv)`), with argument lists drawn from the
real subcommands and flags mixed with awkward values (negative, NaN, huge, empty, unicode). Nothing
expensive runs: `densenet.train.fit` is replaced by a stub that does what `fit` does before its first
step (resolve the config and its milestones, resolve the device, build the model, on the meta device),
and `model_table` (which counts every model's multiply-adds: seconds) by one that returns no rows.
Checkpoints given to eval/predict/export are random text, so those commands stop at loading them;
tests/test_inference.py and tests/test_export.py run them for real. The working directory is a
temporary folder, so no random path can name a real file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import string

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import densenet.analysis.complexity
import densenet.train
from densenet.cli import main
from densenet.models import DenseNetConfig, ResNetConfig
from densenet.registry import list_models
from densenet.train.config import TrainConfig, read_config_file

COMMANDS = ["train", "eval", "models", "predict", "export"]
FLAGS = ["--epochs", "--lr", "--batch-size", "--model", "--dataset", "--depth", "--growth-rate", "--compression",
         "--bn-size", "--config", "--resume", "--model-arg", "--milestones", "--amp", "--augment", "--device",
         "--json", "--out", "--checkpoint", "--format", "--top-k", "--seed", "--split-seed", "--val-size",
         "--image-size", "--resize", "--label-smoothing", "--momentum", "--weight-decay", "--drop-rate",
         "--bottleneck", "--no-bottleneck", "--memory-efficient", "--family", "--split", "--ten-crop",
         "--workers", "--accumulate", "--train-subset", "--in-memory", "--eval-batch-size", "--lr-gamma",
         "--data", "--download", "--no-progress", "--help", "--version", "-h"]
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
# every registered network, the baselines (ResNet, pre-activation, stochastic depth, WRN, ResNeXt) too
MODEL_NAMES = list_models()
# the options of every family's builder and config (a few builder-only names beside the configs' fields)
MODEL_OPTIONS = sorted({f.name for c in (DenseNetConfig, ResNetConfig) for f in dataclasses.fields(c)}
                       | {"depth", "widen_factor", "cardinality", "bottleneck_width", "memory_efficient"})
WORDS = ["digits", "cifar10", "folder", "imagenet",
         "onnx", "torchscript", "bf16", "fp8", "none", "cifar", "auto", "cpu", "cuda", "cuda:7", "mps", "xla:0",
         "foo", "depth=40", "depth=x", "block_config=6,12,24,16", "block_config=", "growth_rate=nan",
         "compression=abc", "bottleneck=maybe", "num_classes=1e400", "foo=1", "=", "model.onnx", "test", "."]
NUMBERS = ["0", "1", "-1", "2", "3", "0.5", "-0.5", "1e-9", "nan", "NaN", "inf", "-inf", "1e309", "10", "100",
           "250", "9" * 30, "-" + "9" * 30, "", " ", "1,2", "0.5,0.75", ",", "0x10", "1_000", "\u0663", "1.5e3"]
MODEL = st.sampled_from(MODEL_NAMES)
MODEL_ARG = st.tuples(st.sampled_from(MODEL_OPTIONS), st.one_of(st.sampled_from(NUMBERS + WORDS), TEXT)).map("=".join)
TOKEN = st.one_of(st.sampled_from(FLAGS), st.sampled_from(WORDS), MODEL, MODEL_ARG, st.sampled_from(NUMBERS),
                  st.integers().map(str), st.floats().map(str), TEXT)
VALUE_TOKEN = st.one_of(st.sampled_from(WORDS), MODEL, st.sampled_from(NUMBERS), st.integers().map(str), TEXT)
JUNK = st.tuples(st.sampled_from(COMMANDS + ["", "--help"]), st.lists(TOKEN, max_size=8)).map(
    lambda t: ([t[0]] if t[0] else []) + t[1])


INTEGER = st.one_of(st.integers().map(str), st.sampled_from(NUMBERS))
NUMBER = st.one_of(st.floats().map(str), st.integers().map(str), st.sampled_from(NUMBERS))


def command(name, options, switches=("--json",), positionals=0):
    """`name`, its positional arguments, then its own options (flag: strategy of values) and switches:
    command lines that get past argparse often enough to reach the code behind it."""
    part = st.one_of(*[st.tuples(st.just(flag), values) for flag, values in options.items()],
                     st.tuples(st.sampled_from(switches)))
    return st.tuples(st.lists(st.one_of(TEXT, st.sampled_from(WORDS)), min_size=positionals,
                              max_size=positionals + 1), st.lists(part, max_size=5)).map(
        lambda t: [name] + t[0] + [token for p in t[1] for token in p])


TRAIN = command("train", {
    **dict.fromkeys(["--epochs", "--batch-size", "--depth", "--growth-rate", "--bn-size", "--seed", "--split-seed",
                     "--val-size", "--image-size", "--resize", "--workers", "--accumulate", "--train-subset",
                     "--eval-batch-size"], INTEGER),
    **dict.fromkeys(["--lr", "--compression", "--label-smoothing", "--momentum", "--weight-decay", "--drop-rate",
                     "--lr-gamma"], NUMBER),
    **dict.fromkeys(["--model", "--dataset", "--amp", "--augment", "--device", "--data"], VALUE_TOKEN),
    "--model-arg": st.one_of(MODEL_ARG, st.sampled_from(WORDS + ["depth=" + n for n in NUMBERS])),
    "--milestones": st.one_of(st.sampled_from(NUMBERS), st.lists(NUMBER, max_size=3).map(",".join))},
    ["--json", "--bottleneck", "--no-bottleneck", "--memory-efficient", "--in-memory", "--download",
     "--no-progress", "--nesterov", "--no-nesterov"])
EVAL = command("eval", {**dict.fromkeys(["--checkpoint", "--dataset", "--data", "--split", "--device"], VALUE_TOKEN),
                        "--batch-size": INTEGER, "--workers": INTEGER}, ["--json", "--ten-crop"])
PREDICT = command("predict", {"--top-k": INTEGER, "--batch-size": INTEGER, "--device": VALUE_TOKEN}, positionals=2)
EXPORT = command("export", {"--format": VALUE_TOKEN, "--out": VALUE_TOKEN}, positionals=1)
MODELS = command("models", {"--family": VALUE_TOKEN})
ARGV = st.one_of(JUNK, TRAIN, TRAIN, TRAIN, EVAL, PREDICT, EXPORT, MODELS)


def fake_fit(cfg, resume=None):
    """What `fit` does before its first step, on the meta device: resolve, check, build."""
    from densenet.train.distributed import Distributed
    from densenet.train.engine import build_model

    cfg = cfg.resolve()
    cfg.lr_milestones()
    Distributed().device(cfg.device)
    with torch.device("meta"):
        build_model(cfg, num_classes=10, in_channels=3)
    return {"epochs": cfg.epochs}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("fuzz"))
        mp.setattr(densenet.train, "fit", fake_fit)
        mp.setattr(densenet.analysis.complexity, "model_table", lambda names: [])
        mp.delenv("DENSENET_DEBUG", raising=False)
        yield


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help/--version exit 0, usage errors exit 2
            code = e.code
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=ARGV)
def test_any_command_line_works_or_fails_cleanly(sandbox, argv):
    code, out, err = run_main(argv)  # any other exception fails the test, with the argv that raised it
    assert isinstance(code, int), (argv, code)
    assert "Traceback" not in err
    if code == 0:
        return
    assert err.strip() or out.strip(), f"{argv}: exit {code} without a word"
    assert code == 1 or "error: " in err or "usage:" in out, (argv, code, err)


@pytest.mark.parametrize("argv", [
    ["train", "--lr", "nan"], ["train", "--lr", "inf"], ["train", "--weight-decay", "1e309"],
    ["train", "--growth-rate", "9" * 30], ["train", "--depth", "9" * 30], ["train", "--seed", "-1"],
    ["train", "--image-size", "0"], ["train", "--model-arg", "compression=abc"],
    ["train", "--model-arg", "depth=1,2"], ["train", "--model", "densenet121", "--model-arg", "depth=1,2"],
    ["train", "--device", "foo"], ["eval", "--checkpoint", "x", "--device", "foo"],
    ["train", "--milestones", "nan"],
    ["train", "--model", "preact_resnet164", "--depth", "1000001"],  # 333,333 units: refused, not built
    ["train", "--model", "resnet20", "--model-arg", "stem_width=abc"],
])
def test_crashes_found_by_fuzzing_are_clear_errors(sandbox, argv):
    code, _, err = run_main(argv)
    assert code == 2 and "Traceback" not in err and err.startswith(f"densenet {argv[0]}: error: "), err
    assert len(err.strip().splitlines()) == 1


def test_the_stub_accepts_a_valid_command_line(sandbox):
    assert run_main(["train", "--epochs", "2", "--depth", "40", "--no-bottleneck"])[0] == 0
    assert run_main(["train", "--model-arg", "block_config=1,2,3", "--model", "densenet121"])[0] == 0


# --- config files --------------------------------------------------------------------------------------

FIELDS = sorted(f.name for f in dataclasses.fields(TrainConfig))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT,
                   st.sampled_from(["digits", "cifar10", "bf16", "cifar", "auto", "cpu"]), MODEL)
VALUE = st.recursive(SCALAR, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=6)
MODEL_ARGS = st.one_of(st.dictionaries(st.sampled_from(MODEL_OPTIONS), VALUE, max_size=4), VALUE)
SETTINGS = st.dictionaries(st.one_of(st.sampled_from(FIELDS), TEXT, st.integers()),
                           st.one_of(VALUE, MODEL_ARGS), max_size=6)


def read_and_resolve(path) -> None:
    """What `densenet train --config FILE` does with a file before training (with fake_fit's checks)."""
    settings_ = read_config_file(path)
    fake_fit(TrainConfig.from_dict(settings_))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=SETTINGS, suffix=st.sampled_from([".yaml", ".json"]))
def test_any_config_file_works_or_raises_value_error(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("cfg") / ("c" + suffix)
    if suffix == ".json":
        path.write_text(json.dumps({str(k): v for k, v in data.items()}))
    else:
        path.write_text(yaml.safe_dump(data))
    try:
        read_and_resolve(path)
    except ValueError:
        pass


VALID_TOML = 'dataset = "digits"\nepochs = 3\nlr = 0.05\nmilestones = [0.5, 0.75]\n[model_args]\ndepth = 40\n'


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(suffix=st.sampled_from([".toml", ".yaml", ".yml", ".json", ".txt"]),
       text=st.one_of(st.text(max_size=80), st.text(string.printable, max_size=80),
                      st.tuples(st.integers(0, len(VALID_TOML)), st.integers(0, len(VALID_TOML)), TEXT).map(
                          lambda t: VALID_TOML[:min(t[:2])] + t[2] + VALID_TOML[max(t[:2]):])))
def test_malformed_config_text_raises_value_error(tmp_path_factory, suffix, text):
    path = tmp_path_factory.mktemp("cfg") / ("c" + suffix)
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        read_and_resolve(path)
    except ValueError:
        pass


@pytest.mark.parametrize("text, suffix, match", [
    ("lr: .nan\n", ".yaml", "lr must be a finite number"),
    ("epochs: [1, 2]\n", ".yaml", "epochs must be an integer"),
    ("model_args: [1, 2]\n", ".yaml", "model_args must be a table"),
    ("model_args: {depth: [40]}\n", ".yaml", "depth must be an integer"),
    ("model_args: {growth_rate: 1.0e+30}\n", ".yaml", "growth_rate must be an integer"),
    ("1: 2\n", ".yaml", "unknown setting"),
    ("dataset = [1]\n", ".toml", "dataset must be a string"),
    ("dataset = \n", ".toml", "could not be read"),
    ('{"seed": 1e999}', ".json", "seed must be an integer"),
    (b"\xff\xfe".decode("latin-1"), ".yaml", "could not be read"),
])
def test_config_file_errors_found_by_fuzzing(tmp_path, text, suffix, match):
    path = tmp_path / ("c" + suffix)
    path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(ValueError, match=match):
        read_and_resolve(path)


@pytest.mark.parametrize("text", ["[1, 2]", "{", "null"])
def test_resume_from_a_damaged_config_json_is_a_clear_error(sandbox, tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    code, _, err = run_main(["train", "--resume", str(tmp_path)])
    assert code == 2 and "config.json is damaged" in err and "Traceback" not in err


def test_config_file_model_args_that_are_not_a_table_and_a_command_line_override(sandbox, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model_args: 7\n")
    code, _, err = run_main(["train", "--config", str(f), "--depth", "40"])
    assert code == 2 and "model_args" in err and "must be a table" in err and "Traceback" not in err
