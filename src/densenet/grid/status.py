"""The state of each cell of a grid, read from its run directory alone (whichever launcher ran it).

    done     RUN/summary.json exists
    running  an attempt holds RUN/densenet.lock now (the run's one lock, train/lock.py)
    failed   the last attempt ended without finishing: RUN/error.json says why, or it died without a
             word (killed, pre-empted, out of memory) and left only its checkpoint
    pending  nothing has run yet, or the cell was handed to a scheduler after its last attempt
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..train.lock import LOCK_FILE, holder
from ..utils.validate import number_field
from .launchers import ERROR_FILE, LAUNCH_FILE, SUMMARY_FILE, _epochs_done, _read_json, checkpoint_epoch

GRID_FILE = "grid.json"  # OUT/grid.json: the grid's name and cells, written by `densenet reproduce`


@dataclass
class CellState:
    key: str
    state: str  # pending, running, done, failed
    epoch: int  # epochs finished
    epochs: int | None  # epochs the cell trains for
    detail: str  # where it runs / why it failed / what it measured
    attempts: int

    def as_dict(self) -> dict:
        return asdict(self)


def cell_state(run_dir: str | Path, key: str | None = None) -> CellState:
    """The cell's state; a damaged record in its directory makes it `failed`, naming the file and what
    is wrong with it (the other cells are still reported)."""
    run = Path(run_dir)
    key = key or str(run)
    try:
        return _cell_state(run, key)
    except ValueError as e:
        return CellState(key, "failed", _epochs_done(run), None, f"{e}; delete or repair it"[:300], 0)


def _count(record: dict | None, field: str, where: Path) -> int:
    value = (record or {}).get(field) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where} is damaged: {field} must be a count, got {value!r}"[:200])
    return value


def _cell_state(run: Path, key: str) -> CellState:
    config = _read_json(run / "config.json") or {}
    launch = _read_json(run / LAUNCH_FILE)
    try:
        last_try = _read_json(run / LOCK_FILE)
    except ValueError:  # empty for a moment while a holder writes it; not a damaged cell
        last_try = None
    epochs = _count(config, "epochs", run / "config.json") or _count(launch, "epochs", run / LAUNCH_FILE) or None
    epoch = _epochs_done(run)
    attempts = _count(last_try, "attempt", run / LOCK_FILE)

    def state(name: str, detail: str) -> CellState:
        return CellState(key, name, epoch, epochs, detail, attempts)

    summary = _read_json(run / SUMMARY_FILE)
    if summary is not None:
        err, split = number_field(summary, "test_top1_error", run / SUMMARY_FILE), "test"
        if err is None:
            err, split = number_field(summary, "val_top1_error", run / SUMMARY_FILE), "val"
        return state("done", f"{split} error {err:.2f}%" if err is not None else "finished")
    who = holder(run)  # the run's one lock: a grid attempt or a `densenet train --out` started by hand
    if who is not None:
        where = f"on {who.get('host', '?')}, pid {who.get('pid', '?')}"
        if who.get("job_id"):
            where += f", {who.get('launcher', '')} job {who['job_id']}".replace("  ", " ")
        return state("running", where + (f", resumed at epoch {who['resumed_at_epoch']}"
                                         if who.get("resumed_at_epoch") else ""))
    started = (last_try or {}).get("started", 0)
    started = started if isinstance(started, (int, float)) else 0  # a record of another format: no time
    if launch is not None and (number_field(launch, "submitted", run / LAUNCH_FILE) or 0) > started:
        job = f" as {launch.get('launcher')} job {launch['job_id']}" if launch.get("job_id") else ""
        note = f" ({launch['note']})" if launch.get("note") else ""
        resumes = checkpoint_epoch(run)
        return state("pending", f"submitted{job}{note}" + (f"; resumes after epoch {resumes}" if resumes else ""))
    error = _read_json(run / ERROR_FILE)
    if error is not None:
        return state("failed", str(error.get("error", "failed"))[:300])
    if last_try is not None or (run / "last").exists():
        return state("failed", f"stopped without finishing (killed, pre-empted or out of memory); run the same "
                               f"command again to resume it after epoch {checkpoint_epoch(run)}")
    return state("pending", "not started")


def read_grid(out: str | Path) -> dict | None:
    return _read_json(Path(out) / GRID_FILE)


def write_grid(out: str | Path, name: str, cells: list) -> None:
    """Record the grid's cells in OUT/grid.json (the union with any recorded before)."""
    from ..utils.atomic import write_text_atomic

    out = Path(out)
    old = read_grid(out)
    if isinstance(old, dict) and isinstance(old.get("grid"), str) and old["grid"] != name:
        raise ValueError(f"{out} holds the {old['grid']} grid (grid.json): give {name} another --out")
    known = [tuple(c) for c in old.get("cells", [])] if isinstance(old, dict) else []
    for c in cells:
        t = (c.row, c.setting, c.seed)
        if t not in known:
            known.append(t)
    write_text_atomic(out / GRID_FILE, json.dumps({"grid": name, "cells": [list(t) for t in known]}, indent=1) + "\n")


def format_table(states: list[CellState]) -> str:
    width = max([len(s.key) for s in states] + [4])
    lines = [f"{'cell':<{width}}  {'state':<8} {'epoch':>9}  detail"]
    for s in states:
        ep = f"{s.epoch}/{s.epochs}" if s.epochs else str(s.epoch)
        lines.append(f"{s.key:<{width}}  {s.state:<8} {ep:>9}  {s.detail}")
    counts = {k: sum(s.state == k for s in states) for k in ("done", "running", "pending", "failed")}
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()) + f" of {len(states)} cells")
    return "\n".join(lines)
