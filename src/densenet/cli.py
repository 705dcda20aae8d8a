"""The `densenet` command: thin subcommands that parse arguments, call the library and print.

Every error ends in one line on stderr and a non-zero exit status, never a traceback (`--debug`, or
DENSENET_DEBUG=1, shows one). Exit status: 0 done; 1 an internal error (please report it), or some
images that `predict` could not read; 2 a mistake in the input (options, files, data, checkpoints), a
resource (memory, disk) or a lost process of a distributed job (resume on every node); 3 training
stopped on non-finite values; 130/143 stopped by Ctrl-C/SIGTERM with a resumable checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from .utils.errors import UsageError, one_line_warnings, printable, report

AddArgs = Callable[[argparse.ArgumentParser], None]
COMMANDS: dict[str, tuple[str, AddArgs, Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_args: AddArgs):
    """Register the decorated function as subcommand `name`, its arguments added by `add_args`."""
    def deco(run):
        COMMANDS[name] = (help, add_args, run)
        return run
    return deco


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# --- densenet models ----------------------------------------------------------------------------------

def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="only these models (default: all)")
    p.add_argument("--family", help="only models of this family (substring, case-insensitive)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("models", "list the registered networks with parameters and multiply-adds", _models_args)
def _models(args: argparse.Namespace) -> int:
    from .analysis.complexity import format_model_table, model_table
    from .registry import get_entry, list_models

    names = args.names or list_models()
    for n in names:
        get_entry(n)  # unknown names: a clear error before any work
    if args.family:
        names = [n for n in names if args.family.lower() in get_entry(n).family.lower()]
    rows = model_table(names)
    if args.json:
        _print_json([r.as_dict() for r in rows])
    else:
        print(format_model_table(rows))
    return 0


# --- densenet train -------------------------------------------------------------------------------------

_MODEL_FLAGS = {"depth": (int, "L, the network's depth (DenseNet-BC: 6n + 4; DenseNet: 3n + 4)"),
                "growth_rate": (int, "k, maps each layer adds"),
                "compression": (float, "theta, transition output fraction"),
                "bn_size": (int, "bottleneck width in multiples of k")}


def _train_args(p: argparse.ArgumentParser) -> None:
    from .train.config import add_setting_args

    S = argparse.SUPPRESS  # unset options stay unset: the config file or the resumed run decides
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file of settings (command-line options win)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR exactly where it stopped")
    add_setting_args(p)  # one option per TrainConfig field, its help text and default from the field
    g = p.add_argument_group("model options (the paper's names; any other with --model-arg)")
    for name, (typ, text) in _MODEL_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=S, dest=f"m_{name}",
                       help=text + " (default: the model's)")
    g.add_argument("--bottleneck", action=argparse.BooleanOptionalAction, default=S, dest="m_bottleneck",
                   help="B: 1x1 bottleneck before each 3x3 convolution (default: the model's)")
    g.add_argument("--memory-efficient", action=argparse.BooleanOptionalAction, default=S, dest="m_memory_efficient",
                   help="recompute in the backward pass instead of storing (same results, less memory)")
    g.add_argument("--model-arg", action="append", default=S, metavar="KEY=VALUE",
                   help="any create_model override, e.g. --model-arg block_config=6,12,24,16")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON on stdout")


@command("train", "train a registered model with the paper's recipe (defaults: the digits first run)", _train_args)
def _train(args: argparse.Namespace) -> int:
    from .train import TrainingStopped, fit
    from .train.config import settings_for_run, settings_from_options

    options = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "json", "debug")}
    cfg = settings_for_run(settings_from_options(options), config_file=args.config, resume=args.resume)
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
    p.add_argument("checkpoint_path", nargs="?", metavar="CHECKPOINT",
                   help="a run directory (the checkpoint its protocol reports: see --which) or a model.safetensors "
                        "file, as for predict, export and reuse (--checkpoint PATH says the same)")
    p.add_argument("--checkpoint", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--which", choices=("best", "last"),
                   help="a run directory's best-validation or final-epoch checkpoint (default: the one the "
                        "protocol reports and the run's summary tested: CIFAR final, SVHN best)")
    p.add_argument("--dataset", help="default: the dataset the checkpoint was trained on")
    p.add_argument("--data", metavar="PATH", help="default: the path the checkpoint was trained from")
    p.add_argument("--split", choices=("val", "test", "train"), default="test",
                   help="test: the dataset's test split (folder: test/, else val/); val: the run's held-out images")
    p.add_argument("--ten-crop", action="store_true",
                   help="sum the logits of 10 crops (corners, centre, mirrored), as the authors' train.lua")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=4, help="loading processes for streamed folders")
    p.add_argument("--json", action="store_true", help='one JSON object: {"top1_error", "top5_error", "images", ...}')
    p.add_argument("--recalibrate-bn", type=int, metavar="N",
                   help="first re-estimate the BN statistics on N training images with dropout off (outside the "
                        "paper's protocol; removes dropout's variance shift; the checkpoint is not changed)")


def _eval_checkpoint(args: argparse.Namespace) -> str:
    if args.checkpoint and args.checkpoint_path and args.checkpoint != args.checkpoint_path:
        raise UsageError(f"two checkpoints given ({args.checkpoint_path} and --checkpoint {args.checkpoint}): give one")
    path = args.checkpoint or args.checkpoint_path
    if not path:
        raise UsageError("which checkpoint? give a run directory or a model.safetensors file: "
                         "densenet eval runs/digits")
    return path


@command("eval", "top-1 and top-5 error of a checkpoint on a dataset split", _eval_args)
def _eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_checkpoint, format_result

    checkpoint = _eval_checkpoint(args)
    result, origin = evaluate_checkpoint(checkpoint, split=args.split, dataset=args.dataset, data=args.data,
                                         which=args.which, ten_crop=args.ten_crop, recalibrate_bn=args.recalibrate_bn,
                                         batch_size=args.batch_size, workers=args.workers, device=args.device)
    if args.json:
        _print_json(result)
    else:
        print(format_result(result, checkpoint_line(origin, result["model"])))
    return 0


def checkpoint_line(c, model: str) -> str:
    """What a command read, one line: 'checkpoint RUN/last/model.safetensors (MODEL, epoch 8; the
    protocol's: test_on final)' (`densenet.runs` chose it)."""
    epoch = f", epoch {c.epoch}" if c.epoch is not None else ""
    why = f"; {c.why}" if c.why else ""
    return f"checkpoint {c.file} ({model}{epoch}{why})"


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
    from .analysis.complexity import format_profile, profile

    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    results = [profile(m, args.input_size, args.batch_size) for m in args.models]
    if args.json:
        _print_json([r.as_dict() for r in results])
    else:
        print(format_profile(results, args.batch_size, args.stages))
    return 0


def _reuse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run directory or model.safetensors of a trained DenseNet")
    p.add_argument("--out", required=True, help="figure file (.png); the numbers go beside it (.csv, .json)")
    p.add_argument("--which", choices=("best", "last"),
                   help="a run directory's checkpoint (default: the one its protocol reports, as `eval`)")
    p.add_argument("--model", help="for a torchvision checkpoint: the registered name (e.g. densenet121)")


@command("reuse", "the feature-reuse heatmap of the paper's Figure 5 for a trained DenseNet", _reuse_args)
def _reuse(args: argparse.Namespace) -> int:
    from .analysis.reuse import feature_reuse, network_name, save_reuse
    from .analysis.reuse_command import load_for_reuse

    def read(origin, model_name: str) -> None:
        print(f"densenet reuse: {checkpoint_line(origin, model_name)}", file=sys.stderr)

    loaded = load_for_reuse(args.checkpoint, args.which, args.model, on_read=read)
    if loaded.note:
        print(f"densenet reuse: warning: {loaded.note}", file=sys.stderr)
    # the network as trained (an L=40 run of the densenet_bc_100_k12 entry is DenseNet-BC L=40)
    title = f"Feature reuse: {network_name(loaded.model)}"
    for path in save_reuse(feature_reuse(loaded.model), args.out, title=title):
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
    from .grid.launchers import add_launcher_args
    from .grid.reproduce import GRIDS

    p.add_argument("grid", choices=[*GRIDS, "status"], help="; ".join(f"{k}: {v['about']}" for k, v in GRIDS.items())
                   + "; status: the state of each cell of a grid directory (then rebuilds results.md)")
    p.add_argument("target", nargs="?", metavar="GRID_DIR",
                   help="for status: the grid directory (the --out of the run), or a grid name with --out")
    p.add_argument("--out", help="grid directory: one run directory per cell, results.md/.csv (not needed with --dry-run)")
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
    p.add_argument("--json", action="store_true", help="status: print the cells' states as JSON")
    add_launcher_args(p)


@command("reproduce", "run a named grid of the paper's experiments (here, on SLURM or on Ray); tables beside "
                      "the published numbers; `reproduce status DIR`: each cell's state", _reproduce_args)
def _reproduce(args: argparse.Namespace) -> int:
    from .grid.command import check_grid_options, parse_data_options, run_grid
    from .grid.launchers import options_from_args

    if args.grid == "status":
        return _reproduce_status(args)
    if args.target is not None:
        raise UsageError(f"unexpected argument {args.target!r}: the grid directory is given with --out")
    check_grid_options(args.out, args.epochs, args.budget, args.seeds, args.dry_run)  # first, as before the move
    return run_grid(args.grid, args.out, launch_options=options_from_args(args), data=parse_data_options(args.data),
                    epochs=args.epochs, budget=args.budget, seeds=args.seeds, only=args.only,
                    dry_run=args.dry_run, device=args.device, amp=args.amp)


def _reproduce_status(args: argparse.Namespace) -> int:
    """Each cell's state from its run directory alone; results.md rebuilt from the finished cells."""
    from .grid.command import status
    from .grid.status import format_table

    states, tables = status(args.target, args.out, args.seeds, args.only)
    if args.json:
        _print_json([s.as_dict() for s in states])
    else:
        print(format_table(states))
    for p in tables:
        print(p, file=sys.stderr if args.json else sys.stdout)
    return 0


# --- densenet predict -----------------------------------------------------------------------------------

def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run directory (the checkpoint its protocol reports, as `eval`) or a "
                                      "model.safetensors file")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders searched recursively for images")
    p.add_argument("--which", choices=("best", "last"),
                   help="a run directory's checkpoint (default: the one its protocol reports, as `eval`)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (at most the number of classes)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true",
                   help='a JSON list of {"path", "predictions": [{"class", "index", "probability"}]} '
                        'or {"path", "error"}')
    p.add_argument("--include-hidden", action="store_true",
                   help="also search hidden files and folders (names starting with '.') below the given folders")
    p.add_argument("--compile", action="store_true",
                   help="compile the model for the CPU first (AOTInductor; densenet.optimize): faster per image, "
                        "tens of seconds to minutes to compile, so for many images")


@command("predict", "the most probable classes of images, preprocessed as the checkpoint's training did; "
                    "exit status 1 if any image failed", _predict_args)
def _predict(args: argparse.Namespace) -> int:
    from .inference import find_images, load, predict
    from .train.distributed import Distributed

    if args.top_k < 1 or args.batch_size < 1:
        raise UsageError(f"--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}")
    device = Distributed().device(args.device)
    if args.compile and device.type != "cpu":
        raise UsageError(f"--compile compiles for the CPU; the run would use {device}: add --device cpu")
    model, transform = load(args.checkpoint, device, args.which)
    print(f"densenet predict: {checkpoint_line(model.checkpoint, model.model_name)}", file=sys.stderr)
    if args.compile:
        from .compiled import optimize

        model = optimize(model, (transform.channels, *transform.image_size))
        print(f"densenet predict: compiled in {model.compile_seconds:.0f} s (AOTInductor; max |logit difference| "
              f"from eager {max(model.max_abs_diff.values()):.1e})", file=sys.stderr)
    paths = [p for p, _ in find_images(args.paths, include_hidden=args.include_hidden)]  # folders walked once
    shown = {p: printable(p) for p in paths}  # a newline or escape in a file name stays on its line
    path_width, class_width = max(map(len, shown.values())), max(map(len, model.classes))
    results, failed = [], 0
    for r in predict(model, transform, paths, top_k=args.top_k, batch_size=args.batch_size):
        if "error" in r:
            failed += 1
            print(f"densenet predict: error: {printable(r['error'])}", file=sys.stderr)
        elif not args.json:
            print(f"{shown[r['path']]:<{path_width}}  " + "  ".join(
                f"{p['class']:<{class_width}} {p['probability']:.4f}" for p in r["predictions"]), flush=True)
        results.append(r)
    if args.json:
        _print_json(results)
    if failed:
        print(f"densenet predict: {failed} of {len(results)} images failed", file=sys.stderr)
    return 1 if failed else 0


# --- densenet export ------------------------------------------------------------------------------------

def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run directory (the checkpoint its protocol reports, as `eval`) or a "
                                      "model.safetensors file")
    p.add_argument("--which", choices=("best", "last"),
                   help="a run directory's checkpoint (default: the one its protocol reports, as `eval`)")
    p.add_argument("--format", choices=("onnx", "torchscript", "aoti"), required=True,
                   help="aoti: an AOTInductor package (.pt2) compiled for this machine's CPU, loaded without this "
                        "package by torch._inductor.aoti_load_package or libtorch's AOTIModelPackageLoader")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (replaced atomically)")
    p.add_argument("--onnx-exporter", choices=("auto", "dynamo", "legacy"), default="auto",
                   help="torch.export-based (needs onnxscript) or the older TorchScript-based exporter; "
                        "auto: dynamo where onnxscript is installed")
    p.add_argument("--opset", type=int, metavar="N",
                   help="ONNX opset to target, for runtimes that read only older ones (default: the exporter's)")
    p.add_argument("--json", action="store_true", help="print the report (shapes, parity) as JSON")


@command("export", "write a checkpoint as ONNX, TorchScript or an AOTInductor package with a dynamic batch size, "
                   "and check it "
                   "against PyTorch", _export_args)
def _export(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from .export import export_checkpoint, format_report

    r = export_checkpoint(args.checkpoint, args.out, args.format, which=args.which,
                          onnx_exporter=args.onnx_exporter, opset=args.opset)
    c = r["checkpoint"]
    print(f"densenet export: {checkpoint_line(SimpleNamespace(**c), c['model'])}", file=sys.stderr)
    parity = r["parity"]
    if args.json:
        _print_json(r)
    else:
        print(format_report(r))
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
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (anywhere on the command line)")
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
    from .utils.interrupts import Interrupts

    with Interrupts() as interrupts:
        try:
            return _main(list(sys.argv[1:] if argv is None else argv), interrupts)
        except KeyboardInterrupt:
            print("densenet: interrupted", file=sys.stderr)
            return 130


def _main(argv: list[str], interrupts) -> int:
    from .options import flag

    debug = "--debug" in argv or flag("DENSENET_DEBUG", False)
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    parser = build_parser(only=_command_name(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _, _, run = COMMANDS[args.command]
    try:
        with one_line_warnings(f"densenet {args.command}"):
            return int(run(args) or 0)
    except Exception as e:  # the top of the program: every error is one line
        if debug:
            raise
        line, status = report(args.command, e, interrupted=interrupts.seen)
        print(line, file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
