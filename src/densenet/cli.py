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
        paper_p = f"{r.paper_params:,}" if r.paper_params else "-"
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
    splits = load_splits(cfg.dataset, cfg.data, svhn_extra=cfg.svhn_extra,
                         in_memory=pre["source"] == "memory", in_channels=pre["channels"])
    if len(splits.classes) != len(info["classes"]):
        raise UsageError(f"the checkpoint has {len(info['classes'])} classes, the dataset {len(splits.classes)}")
    train, val, test = select_splits(cfg, splits)
    data = {"train": train, "val": val, "test": test}[args.split]
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

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="densenet", description="DenseNet (Huang et al., CVPR 2017) exactly as the paper specifies it.")
    parser.add_argument("--version", action="version", version=f"densenet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
