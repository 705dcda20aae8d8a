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
