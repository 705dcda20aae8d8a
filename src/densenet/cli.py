"""The `densenet` command: thin subcommands that parse arguments, call the library and print.

Every error a user can cause ends in one line on stderr and a non-zero exit status, never a traceback
(set DENSENET_DEBUG=1 to see one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

AddArgs = Callable[[argparse.ArgumentParser], None]
COMMANDS: dict[str, tuple[str, AddArgs, Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_args: AddArgs):
    """Register the decorated function as subcommand `name`, its arguments added by `add_args`."""
    def deco(run):
        COMMANDS[name] = (help, add_args, run)
        return run
    return deco


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line."""


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# --- densenet models ----------------------------------------------------------------------------------

def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="only these models (default: all)")
    p.add_argument("--family", help="only models of this family (substring, case-insensitive)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("models", "list the registered networks with parameters and multiply-adds", _models_args)
def _models(args: argparse.Namespace) -> int:
    from .analysis.complexity import model_table
    from .registry import get_entry, list_models

    names = args.names or list_models()
    for n in names:
        get_entry(n)  # unknown names: a clear error before any work
    if args.family:
        names = [n for n in names if args.family.lower() in get_entry(n).family.lower()]
    rows = model_table(names)
    if args.json:
        _print_json([r.as_dict() for r in rows])
        return 0
    family = None
    header = f"{'model':<24}{'params':>14}{'paper':>14}{'GMACs':>9}{'paper':>9}  {'input':<11}description"
    for r in rows:
        if r.family != family:
            family = r.family
            print(f"\n{family}\n{header}")
        paper_p = r.paper_params_text
        paper_m = f"{r.paper_gmacs:.3f}" if r.paper_gmacs else "-"
        size = "x".join(map(str, r.input_size))
        print(f"{r.name:<24}{r.params:>14,}{paper_p:>14}{r.macs / 1e9:>9.3f}{paper_m:>9}  {size:<11}{r.description}")
    return 0


# --- densenet train -------------------------------------------------------------------------------------

def _config_field_help() -> dict[str, str]:
    """The one-line comments beside TrainConfig's fields, as help texts (written once, in config.py)."""
    import inspect
    import re

    from .train.config import TrainConfig

    helps = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2)
    return helps


_MODEL_FLAGS = {"depth": int, "growth_rate": int, "compression": float, "bn_size": int}


def _train_args(p: argparse.ArgumentParser) -> None:
    import dataclasses
    import typing

    from .data import DATASETS
    from .train.config import TrainConfig

    S = argparse.SUPPRESS  # unset options stay unset: the config file or the resumed run decides
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file of settings (command-line options win)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR exactly where it stopped")
    helps = _config_field_help()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_args":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        h = helps.get(f.name, "")
        if f.name == "dataset":
            h += " | " + "; ".join(f"{n}: {d.description}" for n, d in DATASETS.items())
        if kind in (bool, bool | None):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=S, help=h)
        elif f.name == "milestones":
            p.add_argument(flag, default=S, metavar="E1,E2", help=h,
                           type=lambda t: tuple(float(v) for v in t.split(",") if v.strip()))
        else:
            base = next((t for t in (int, float, str) if t == kind or t in typing.get_args(kind)), str)
            p.add_argument(flag, type=base, default=S, help=h, metavar=f.name.upper())
    g = p.add_argument_group("model options (the paper's names; any other with --model-arg)")
    for name, typ in _MODEL_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=S, dest=f"m_{name}")
    g.add_argument("--bottleneck", action=argparse.BooleanOptionalAction, default=S, dest="m_bottleneck")
    g.add_argument("--memory-efficient", action=argparse.BooleanOptionalAction, default=S, dest="m_memory_efficient")
    g.add_argument("--model-arg", action="append", default=S, metavar="KEY=VALUE",
                   help="any create_model override, e.g. --model-arg block_config=6,12,24,16")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON on stdout")


def _train_settings(args: argparse.Namespace) -> dict:
    from .train.config import parse_value

    given = {k: v for k, v in vars(args).items()
             if k not in ("command", "config", "resume", "json", "model_arg") and not k.startswith("m_")}
    model_args = {k[2:]: v for k, v in vars(args).items() if k.startswith("m_")}
    for item in getattr(args, "model_arg", []) or []:
        if "=" not in item:
            raise UsageError(f"--model-arg takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        model_args[k.strip()] = parse_value(v)
    if model_args:
        given["model_args"] = model_args
    return given


@command("train", "train a registered model with the paper's recipe (defaults: the digits first run)", _train_args)
def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, TrainingStopped, fit
    from .train.checkpoint import RunDir
    from .train.config import read_config_file

    settings: dict = {}
    if args.resume:
        settings.update(RunDir(args.resume).read_config())
    if args.config:
        settings.update(read_config_file(args.config))
    given = _train_settings(args)
    if "model_args" in given and "model_args" in settings:
        if not isinstance(settings["model_args"], dict):
            raise UsageError(f"model_args in {args.config or args.resume} must be a table of option = value, "
                             f"got {settings['model_args']!r}"[:300])
        given["model_args"] = {**settings["model_args"], **given["model_args"]}
    settings.update(given)
    if args.resume:
        settings["out"] = args.resume
    cfg = TrainConfig.from_dict(settings)
    try:
        summary = fit(cfg, resume=args.resume)
    except TrainingStopped as e:
        print(f"densenet train: {e}", file=sys.stderr)
        return e.exit_code
    if args.json:
        _print_json(summary)
    return 0


# --- densenet eval --------------------------------------------------------------------------------------

def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a run directory (its best checkpoint) or a model.safetensors file")
    p.add_argument("--dataset", help="default: the dataset the checkpoint was trained on")
    p.add_argument("--data", metavar="PATH", help="default: the path the checkpoint was trained from")
    p.add_argument("--split", choices=("val", "test", "train"), default="test",
                   help="test: the dataset's test split (folder: test/, else val/); val: the run's held-out images")
    p.add_argument("--ten-crop", action="store_true", help="average the softmax over 10 crops (corners, centre, mirrored)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=4, help="loading processes for streamed folders")
    p.add_argument("--json", action="store_true", help='one JSON object: {"top1_error", "top5_error", "images", ...}')


@command("eval", "top-1 and top-5 error of a checkpoint on a dataset split", _eval_args)
def _eval(args: argparse.Namespace) -> int:
    import dataclasses

    from .data import load_splits
    from .train.config import TrainConfig
    from .train.distributed import Distributed
    from .train.engine import evaluate, evaluation_batches, select_splits
    from .weights import load_model

    device = Distributed().device(args.device)
    model, info = load_model(args.checkpoint, device)
    saved = info.get("config") or {}
    cfg = TrainConfig.from_dict({k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    if args.dataset:
        cfg = dataclasses.replace(cfg, dataset=args.dataset, val_size=None if args.dataset != cfg.dataset else cfg.val_size)
    if args.data:
        cfg = dataclasses.replace(cfg, data=args.data)
    cfg = cfg.resolve()
    pre = info["preprocessing"]
    test_only = args.split == "test"  # the test split alone is read (and SVHN's extra images are not)
    splits = load_splits(cfg.dataset, cfg.data, svhn_extra=cfg.svhn_extra and not test_only,
                         in_memory=pre["source"] == "memory", in_channels=pre["channels"],
                         only=("test",) if test_only else None)
    if len(splits.classes) != len(info["classes"]):
        raise UsageError(f"the checkpoint has {len(info['classes'])} classes, the dataset {len(splits.classes)}")
    data = splits.test if test_only else dict(zip(("train", "val"), select_splits(cfg, splits)))[args.split]
    if data is None:
        where = cfg.data or cfg.dataset
        raise UsageError(f"{where} has no {args.split} split" +
                         (" (a folder needs test/ or val/)" if args.split == "test" else " (the run used --val-size 0)"))
    batches = evaluation_batches(data, pre, args.batch_size, device, ten_crop=args.ten_crop, workers=args.workers)
    result = evaluate(model, batches)
    result = {"top1_error": result["top1_error"], "top5_error": result["top5_error"], "images": result["images"],
              "loss": result["loss"], "split": args.split, "dataset": cfg.dataset, "ten_crop": args.ten_crop,
              "model": info["model"]}
    if args.json:
        _print_json(result)
    else:
        print(f"{info['model']} on {cfg.dataset} {args.split}{' (10-crop)' if args.ten_crop else ''}: "
              f"top-1 error {result['top1_error']:.2f}%, top-5 error {result['top5_error']:.2f}% "
              f"({result['images']} images)")
    return 0


# --- analyses: profile, reuse, plot, reproduce -------------------------------------------------------

def _size(text: str) -> tuple[int, int, int]:
    parts = [int(v) for v in text.lower().replace("x", ",").split(",") if v.strip()]
    if len(parts) == 1:
        parts = [3, parts[0], parts[0]]
    elif len(parts) == 2:
        parts = [3, *parts]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"input size {text!r}: give H, HxW or CxHxW (e.g. 32, 3x224x224)")
    return tuple(parts)


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL", help="registered names (`densenet models`)")
    p.add_argument("--input-size", type=_size, help="H, HxW or CxHxW (default: the paper's for each model)")
    p.add_argument("--batch-size", type=int, default=64, help="batch of the training step whose memory is counted")
    p.add_argument("--stages", action="store_true", help="one row per stage (stem, blocks, transitions, head)")
    p.add_argument("--json", action="store_true")


@command("profile", "parameters, multiply-adds and training activation memory, per model and per stage",
         _profile_args)
def _profile(args: argparse.Namespace) -> int:
    from .analysis.complexity import profile

    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    results = [profile(m, args.input_size, args.batch_size) for m in args.models]
    if args.json:
        _print_json([r.as_dict() for r in results])
        return 0
    mb = 2 ** 20
    print(f"{'model':<22}{'input':<11}{'params':>13}{'paper':>13}{'GMACs':>9}{'paper':>8}"
          f"{'activations':>14}  (training step, batch {args.batch_size}, float32)")
    for r in results:
        pp = f"{r.paper_params:,}" if r.paper_params else "-"
        pm = f"{r.paper_gmacs:.3f}" if r.paper_gmacs else "-"
        print(f"{r.model:<22}{'x'.join(map(str, r.input_size)):<11}{r.params:>13,}{pp:>13}{r.macs / 1e9:>9.3f}"
              f"{pm:>8}{r.activation_bytes / mb:>11.1f} MB")
        if args.stages:
            for st in r.stages:
                print(f"  {st.name:<31}{st.params:>13,}{'':>13}{st.macs / 1e9:>9.3f}{'':>8}"
                      f"{st.activation_bytes / mb:>11.1f} MB")
    return 0


def _reuse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run directory or model.safetensors of a trained DenseNet")
    p.add_argument("--out", required=True, help="figure file (.png); the numbers go beside it (.csv, .json)")
    p.add_argument("--model", help="for a torchvision checkpoint: the registered name (e.g. densenet121)")


@command("reuse", "the feature-reuse heatmap of the paper's Figure 5 for a trained DenseNet", _reuse_args)
def _reuse(args: argparse.Namespace) -> int:
    from .analysis.reuse import feature_reuse, save_reuse
    from .registry import create_model
    from .weights import load_model

    if args.model:
        model, title = create_model(args.model, pretrained=args.checkpoint), args.model
    else:
        model, info = load_model(args.checkpoint)
        title = info["model"]
    for path in save_reuse(feature_reuse(model), args.out, title=f"Feature reuse: {title}"):
        print(path)
    return 0


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of `densenet train`")
    p.add_argument("--out", required=True, help="folder for curves.png, error_vs_params.png, error_vs_flops.png")
    p.add_argument("--setting", choices=("C10", "C10+", "C100", "C100+", "SVHN"),
                   help="the paper's data setting to draw beside the runs, where the dataset does not say "
                        "(e.g. C10+ for the CIFAR-10 images given as a folder)")


@command("plot", "training curves and error against parameters and FLOPs, beside the paper's points", _plot_args)
def _plot(args: argparse.Namespace) -> int:
    from .analysis.plots import plot_runs

    for path in plot_runs(args.runs, args.out, args.setting):
        print(path)
    return 0


def _reproduce_args(p: argparse.ArgumentParser) -> None:
    from .analysis.reproduce import GRIDS

    p.add_argument("grid", choices=list(GRIDS), help="; ".join(f"{k}: {v['about']}" for k, v in GRIDS.items()))
    p.add_argument("--out", required=True, help="grid directory: one run directory per cell, results.md/.csv")
    p.add_argument("--data", action="append", default=[], metavar="DATASET=PATH",
                   help="where each dataset is, e.g. --data cifar10=~/data/cifar (repeat); a .tar.gz or "
                        "train/ folder is read as an image folder")
    p.add_argument("--epochs", type=int, help="train every cell for this many epochs (schedule scaled)")
    p.add_argument("--budget", type=float, help="train every cell for this fraction of the paper's epochs")
    p.add_argument("--seeds", type=int, default=1, help="runs per cell; the table reports mean ± std")
    p.add_argument("--only", action="append", default=[], metavar="ROW[/SETTING]",
                   help="run only these cells (repeat), e.g. densenet_40_k12/C10+")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their cost; train nothing")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")


@command("reproduce", "run a named grid of the paper's experiments; tables beside the published numbers",
         _reproduce_args)
def _reproduce(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .analysis.complexity import count_macs
    from .analysis.reproduce import cell_config, cost, grid_cells, status, write_tables
    from .paper import SETTING_DATA
    from .registry import create_model
    from .train import TrainingStopped, fit

    if args.epochs is not None and args.epochs < 1 or args.budget is not None and not 0 < args.budget <= 1:
        raise UsageError("--epochs must be >= 1 and --budget in (0, 1]")
    if args.seeds < 1:
        raise UsageError("--seeds must be >= 1")
    data = {}
    for item in args.data:
        if "=" not in item:
            raise UsageError(f"--data takes DATASET=PATH, got {item!r}")
        k, v = item.split("=", 1)
        data[k.strip()] = str(Path(v).expanduser())
    out = Path(args.out)
    cells = grid_cells(args.grid, args.seeds)
    if args.only:
        cells = [c for c in cells if any(o in (c.row, f"{c.row}/{c.setting}") for o in args.only)]
        if not cells:
            raise UsageError(f"--only {' '.join(args.only)} matches no cell of {args.grid}")
    train_images = {"cifar10": 45_000, "cifar100": 45_000, "svhn": 604_388 - 6_000}
    total = 0.0
    extra = {"device": args.device, "amp": args.amp}
    for c in cells:
        cfg = cell_config(c, data, args.epochs, args.budget, out, extra)
        dataset = SETTING_DATA[c.setting][0]
        with torch.device("meta"):
            macs = count_macs(create_model(c.row, num_classes=100 if dataset == "cifar100" else 10), (3, 32, 32))
        macs_run = cost(cfg, macs, train_images[dataset])
        total += macs_run
        st = status(c, out)
        where = data.get(dataset)
        line = (f"{c.row:<22}{c.setting:<7}seed {c.seed}  {cfg.epochs:>4} epochs  {macs_run / 1e15:8.2f} PMACs  "
                f"{st:<8}{'' if where else '(no --data ' + dataset + '=PATH: skipped)'}")
        print(line)
        if args.dry_run or st == "done" or not where:
            continue
        try:
            fit(cfg, resume=str(c.path(out)) if st == "partial" else None)
        except TrainingStopped as e:
            write_tables(args.grid, cells, out)
            print(f"densenet reproduce: {e}; run the same command again to continue the grid", file=sys.stderr)
            return e.exit_code
        write_tables(args.grid, cells, out)
    print(f"total: {len(cells)} runs, {total / 1e15:.2f} PMACs of training (forward + backward ~ 3 forward passes)")
    if not args.dry_run:
        for p in write_tables(args.grid, cells, out):
            print(p)
    return 0


# --- densenet predict -----------------------------------------------------------------------------------

def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run directory (its best checkpoint) or a model.safetensors file")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders searched recursively for images")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (at most the number of classes)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true",
                   help='a JSON list of {"path", "predictions": [{"class", "index", "probability"}]} '
                        'or {"path", "error"}')


@command("predict", "the most probable classes of images, preprocessed as the checkpoint's training did; "
                    "exit status 1 if any image failed", _predict_args)
def _predict(args: argparse.Namespace) -> int:
    from .inference import find_images, load, predict
    from .train.distributed import Distributed

    if args.top_k < 1 or args.batch_size < 1:
        raise UsageError(f"--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}")
    model, transform = load(args.checkpoint, Distributed().device(args.device))
    paths = [p for p, _ in find_images(args.paths)]  # folders walked once, here
    path_width, class_width = max(map(len, paths)), max(map(len, model.classes))
    results, failed = [], 0
    for r in predict(model, transform, paths, top_k=args.top_k, batch_size=args.batch_size):
        if "error" in r:
            failed += 1
            print(f"densenet predict: error: {r['error']}", file=sys.stderr)
        elif not args.json:
            print(f"{r['path']:<{path_width}}  " + "  ".join(
                f"{p['class']:<{class_width}} {p['probability']:.4f}" for p in r["predictions"]), flush=True)
        results.append(r)
    if args.json:
        _print_json(results)
    if failed:
        print(f"densenet predict: {failed} of {len(results)} images failed", file=sys.stderr)
    return 1 if failed else 0


# --- densenet export ------------------------------------------------------------------------------------

def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run directory (its best checkpoint) or a model.safetensors file")
    p.add_argument("--format", choices=("onnx", "torchscript"), required=True)
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (replaced atomically)")
    p.add_argument("--onnx-exporter", choices=("auto", "dynamo", "legacy"), default="auto",
                   help="torch.export-based (needs onnxscript) or the older TorchScript-based exporter; "
                        "auto: dynamo where onnxscript is installed")
    p.add_argument("--json", action="store_true", help="print the report (shapes, parity) as JSON")


@command("export", "write a checkpoint as ONNX or TorchScript with a dynamic batch size, and check it "
                   "against PyTorch", _export_args)
def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    r = export_checkpoint(args.checkpoint, args.out, args.format, onnx_exporter=args.onnx_exporter)
    parity = r["parity"]
    if args.json:
        _print_json(r)
    else:
        shape = lambda s: "(" + ", ".join(map(str, s)) + ")"  # noqa: E731
        fmt = {"onnx": "ONNX", "torchscript": "TorchScript"}[r["format"]]
        print(f"wrote {r['path']}: {fmt} by {r['exporter']}; input \"{r['input']['name']}\" "
              f"{shape(r['input']['shape'])} float32 -> \"{r['output']['name']}\" {shape(r['output']['shape'])}")
        if parity["ok"] is None:
            print(f"parity with PyTorch: not checked ({parity['note']})")
        else:
            diffs = ", ".join(f"{d:.2e} at batch {b}" for b, d in parity["max_abs_diff"].items())
            print(f"parity with PyTorch ({parity['runtime']}): max |logit difference| {diffs} "
                  f"(tolerance {parity['tolerance']:.0e}): {'ok' if parity['ok'] else 'FAILED'}")
    if parity["ok"] is False:
        print(f"densenet export: error: {r['path']} differs from PyTorch by more than {parity['tolerance']:g}",
              file=sys.stderr)
        return 1
    return 0


# --- entry point ----------------------------------------------------------------------------------------

def build_parser(only: str | None = "") -> argparse.ArgumentParser:
    """The parser of every subcommand; with `only`, the arguments of that subcommand alone (the
    others keep their name and help line): adding a subcommand's arguments may import torch, which
    `densenet --help` and `--version` do without."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="densenet", description="DenseNet (Huang et al., CVPR 2017) exactly as the paper specifies it.")
    parser.add_argument("--version", action="version", version=f"densenet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        if only == "" or only == name:
            add_args(p)
    return parser


def _command_name(argv: Sequence[str]) -> str | None:
    """The subcommand argv names: its first word that is not an option (the top level takes no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_command_name(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _, _, run = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("densenet: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as e:
        if os.environ.get("DENSENET_DEBUG"):
            raise
        msg = str(e) or type(e).__name__
        print(f"densenet {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
