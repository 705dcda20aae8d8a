"""Which checkpoint a path means: the one rule every reader of a run directory follows.

`densenet eval`, `predict`, `export`, `reuse`, `densenet.load`, `load_model`, `create_model(pretrained=RUN)`
and the Hub all read a run directory's checkpoint through `resolve_checkpoint`:

- a run directory of `densenet train` (with `last/` and `best/`): `which` ("best" or "last") when given,
  else the protocol's, the checkpoint the run's summary measured its test error on (config.json's
  `test_on`: final -> `last/`, best -> `best/`; CIFAR's protocol reports the final epoch, SVHN's the best
  validation error);
- a checkpoint directory (`RUN/last`, a `save_pretrained` folder): its model.safetensors;
- a file: itself.

The answer names the file, which checkpoint it is, why, and the epoch it was saved at, so every command
can say what it read (`cli.checkpoint_line`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .utils.validate import parse_json, read_json

MODEL_FILE = "model.safetensors"
WHICH = ("best", "last")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: `file` to read; for a run's checkpoint `which` (best or last), `why` it
    was chosen, and the `epoch` (and `step` into the next epoch, 0 at an epoch's end) it was saved at."""

    file: Path
    which: str | None = None
    why: str | None = None
    epoch: int | None = None
    step: int | None = None


def is_run_directory(path: Path) -> bool:
    return path.is_dir() and any((path / w).exists() for w in WHICH) and not (path / MODEL_FILE).is_file()


def protocol_which(run: Path) -> tuple[str, str]:
    """The checkpoint a run's protocol reports, and why: config.json's test_on (`densenet train` records
    it resolved by the recipe; without it, the final epoch)."""
    try:
        saved = read_json(run / "config.json")
    except (OSError, ValueError):  # missing or damaged: the final epoch (reading it says what is wrong)
        saved = {}
    test_on = saved.get("test_on") if isinstance(saved, dict) else None
    if test_on == "best":
        return "best", "the protocol's: test_on best"
    return "last", "the protocol's: test_on final" if test_on == "final" else "the protocol's: the final epoch"


def resolve_checkpoint(path: str | Path, which: str | None = None) -> Checkpoint:
    """The checkpoint `path` means (module docstring). Raises CheckpointError with what to give instead."""
    if which is not None and which not in WHICH:
        raise CheckpointError(f"which must be best or last, got {which!r}")
    path = Path(path).expanduser()
    if is_run_directory(path):
        if which is None:
            which, why = protocol_which(path)
        else:
            why = f"--which {which}"
        target = path / which / MODEL_FILE
        other = "best" if which == "last" else "last"
        if not target.is_file() and "protocol" in why and (path / other / MODEL_FILE).is_file():
            # a run directory with one of the two (put together by hand, or copied in part): that one, said so
            which, why, target = other, f"{why} names {which}/, which is missing: {other}/", path / other / MODEL_FILE
        if not target.is_file():
            raise CheckpointError(f"{path} has no {which}/ checkpoint ({which}/{MODEL_FILE} is missing)")
        if path.resolve() not in target.resolve().parents:
            raise CheckpointError(f"{path / which} points outside {path} (to {target.parent.resolve()}); "
                                  f"give that checkpoint's path instead")
        return _with_epoch(Checkpoint(target, which, why))
    if which is not None:
        raise CheckpointError(f"--which {which} needs a run directory of `densenet train` (with best/ and "
                              f"last/), got {path}")
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            name = path.name if path.name in WHICH else None
            return _with_epoch(Checkpoint(path / MODEL_FILE, name, None))
        raise CheckpointError(f"no checkpoint in directory {path}: expected {MODEL_FILE}, best/{MODEL_FILE} or "
                              f"last/{MODEL_FILE} (written by `densenet train --out`)")
    return _with_epoch(Checkpoint(path))


def _with_epoch(c: Checkpoint) -> Checkpoint:
    """The epoch and step a run's checkpoint was saved at, from the state file beside it (a damaged state
    file only loses the epoch: the weights are what is read)."""
    state = c.file.parent / "state.safetensors"
    if not state.is_file():
        return c
    try:
        from safetensors import safe_open

        with safe_open(str(state), framework="pt") as f:
            train = parse_json((f.metadata() or {}).get("train", "{}"), str(state), dict)
        epoch, step = train.get("epoch"), train.get("step")
        if isinstance(epoch, int) and isinstance(step, int):
            return Checkpoint(c.file, c.which, c.why, epoch, step)
    except Exception:  # noqa: BLE001
        pass
    return c
