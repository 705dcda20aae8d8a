"""What `densenet reproduce` does: run the cells of a named grid (counting their cost, skipping the done
and running ones, training here or handing them to a launcher) and read a grid directory's state back.
The command line (cli.py) parses the options and calls these (parse_data_options, run_grid, status),
which check the values given (GridError, a ValueError: one line); run_grid writes its progress through
`echo` (print's signature: a line, optionally file=sys.stderr) as it goes.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from .reproduce import GRIDS, Cell, grid_cells, write_tables

Echo = Callable[..., None]


class GridError(ValueError):
    """A grid, a grid directory or a choice of cells that cannot be used as asked; printed as one line."""


def select_cells(grid: str, seeds: int = 1, only: list[str] | tuple[str, ...] = ()) -> list[Cell]:
    """The cells of `grid` with `seeds` runs each; with `only`, those of these rows (ROW or ROW/SETTING)."""
    cells = grid_cells(grid, seeds)
    if only:
        cells = [c for c in cells if any(o in (c.row, f"{c.row}/{c.setting}") for o in only)]
        if not cells:
            raise GridError(f"--only {' '.join(only)} matches no cell of {grid}")
    return cells


def parse_data_options(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`--data DATASET=PATH` options (repeated) as {dataset: path}, each path with ~ expanded."""
    data = {}
    for item in items:
        if "=" not in item:
            raise GridError(f"--data takes DATASET=PATH, got {item!r}")
        k, v = item.split("=", 1)
        data[k.strip()] = str(Path(v).expanduser())
    return data


def check_grid_options(out, epochs: int | None, budget: float | None, seeds: int, dry_run: bool = False) -> None:
    """GridError (a ValueError) for a missing `out` (a dry run may go without: it lists the cells as not
    started), `epochs` under 1, `budget` outside (0, 1] or `seeds` under 1: the checks `run_grid` makes
    first (the command line makes them before reading its other options, so one mistake is reported the
    same whatever else is on the line)."""
    if not out and not dry_run:
        raise GridError("--out DIR is required: the grid directory (one run directory per cell); "
                        "--dry-run lists the cells without one")
    if epochs is not None and epochs < 1 or budget is not None and not 0 < budget <= 1:
        raise GridError("--epochs must be >= 1 and --budget in (0, 1]")
    if seeds < 1:
        raise GridError("--seeds must be >= 1")


def run_grid(grid: str, out: str | Path, *, launch_options, data: dict[str, str] | None = None,
             epochs: int | None = None, budget: float | None = None, seeds: int = 1,
             only: list[str] | tuple[str, ...] = (), dry_run: bool = False, device: str = "auto",
             amp: str = "none", echo: Echo = print) -> int:
    """Run the cells of `grid` into the grid directory `out` (one run directory per cell, results.md/.csv)
    with the launcher of `launch_options` (grid.launchers.LaunchOptions); with `dry_run`, only list the
    runs and their cost. Returns the command's exit status: 0 done (or handed over), 1 some cells failed,
    a stopped training's own status (TrainingStopped.exit_code) if training here was stopped. Raises
    GridError (a ValueError) for a missing `out` (but in a dry run), `epochs` under 1, `budget` outside
    (0, 1] or `seeds` under 1, before anything runs (`check_grid_options`)."""
    check_grid_options(out, epochs, budget, seeds, dry_run)
    import torch

    from ..analysis.complexity import count_macs
    from ..paper import SETTING_DATA
    from ..registry import create_model
    from ..train import TrainingStopped
    from .launchers import CellJob, check, run_cell
    from .reproduce import cell_config, cell_departures, cell_sources, cost, describe
    from .status import cell_state, write_grid

    data = data or {}
    listed_only = not out  # a dry run without a grid directory: every cell as not started
    out = Path(out or "GRID_DIR")
    cells = select_cells(grid, seeds, only)
    total = 0.0
    extra = {"device": device, "amp": amp}
    if not dry_run:
        check(launch_options, out)
        write_grid(out, grid, cells)
    jobs = []
    macs_of: dict[tuple[str, int], int] = {}  # a network's cells share its count (one per number of classes)
    for c in cells:
        cfg = cell_config(c, data, epochs, budget, out, extra)
        dataset = SETTING_DATA[c.setting][0]
        classes = 100 if dataset == "cifar100" else 10
        if (c.model, classes) not in macs_of:
            with torch.device("meta"):
                macs_of[c.model, classes] = count_macs(create_model(c.model, num_classes=classes), (3, 32, 32))
        n_train = cfg.known_train_images(dataset)  # the setting's dataset, also where given as a folder
        macs_run = cost(cfg, macs_of[c.model, classes], n_train)
        total += macs_run
        st = "pending" if listed_only else cell_state(c.path(out)).state
        where = data.get(dataset)
        line = (f"{c.row:<22}{c.setting:<7}seed {c.seed}  {cfg.epochs:>4} epochs  {macs_run / 1e15:8.2f} PMACs  "
                f"{st:<8}{'' if where else '(no --data ' + dataset + '=PATH: skipped)'}")
        echo(line.rstrip() + "\n    " + describe(c, cfg))
        if dry_run:  # where the recipe comes from, and where the cell departs from it
            echo("\n".join([f"    source: {t}" for t in cell_sources(c, cfg)]
                           + [f"    departs: {t}" for t in cell_departures(c, cfg)]))
        if dry_run or st in ("done", "running") or not where:
            continue
        job = CellJob(f"{c.row}/{c.setting}/seed{c.seed}", str(c.path(out)), cfg.to_dict())
        if launch_options.launcher != "local":
            jobs.append(job)
            continue
        try:
            r = run_cell(job, "local")  # today's behaviour: one cell after another, here
        except TrainingStopped as e:
            write_tables(grid, cells, out)
            echo(f"densenet reproduce: {e}; run the same command again to continue the grid", file=sys.stderr)
            return e.exit_code
        if r["outcome"] == "busy":
            echo(f"  skipped: {r['error']}", file=sys.stderr)
        write_tables(grid, cells, out)
    echo(f"total: {len(cells)} runs, {total / 1e15:.2f} PMACs of training (forward + backward ~ 3 forward passes)")
    if jobs and not dry_run and _launch(grid, cells, out, jobs, launch_options, echo):
        return 1
    if not dry_run:
        for p in write_tables(grid, cells, out):
            echo(p)
    return 0


def _launch(grid: str, cells: list[Cell], out: Path, jobs: list, opts, echo: Echo) -> bool:
    """Hand the jobs to the launcher; True if some cells failed (said on stderr)."""
    from .launchers import launch

    def report(r: dict) -> None:
        extra_text = f": {r['error']}" if r.get("error") else ""
        echo(f"{r['key']}: {r['outcome']}{extra_text}", file=sys.stderr)
        write_tables(grid, cells, out)

    outcomes = launch(jobs, opts, out, report)
    submitted = sum(r["outcome"] == "submitted" for r in outcomes)
    if submitted:
        echo(f"submitted {submitted} cells; follow them with `densenet reproduce status {out}`")
    failed = [r["key"] for r in outcomes if r["outcome"] == "failed"]
    if failed:
        write_tables(grid, cells, out)
        echo(f"densenet reproduce: {len(failed)} cell(s) failed ({', '.join(failed[:3])}"
             f"{', ...' if len(failed) > 3 else ''}); `densenet reproduce status {out}` says why; run the "
             f"same command again to resubmit them", file=sys.stderr)
    return bool(failed)


def grid_status(out: str | Path, grid: str | None = None, seeds: int = 1,
                only: list[str] | tuple[str, ...] = ()) -> tuple[list, list[Path]]:
    """Each cell's state from its run directory alone (grid.status.CellState), and the tables rebuilt
    from the finished cells (results.md, results.csv; none unless `out` is a grid directory of this
    grid). `grid`: the grid's name (its cells chosen by seeds and only); None: the cells that
    OUT/grid.json records."""
    from .status import cell_state, read_grid

    out = Path(out)
    if grid is not None:
        name, cells = grid, select_cells(grid, seeds, only)
    else:
        if not out.is_dir():
            raise GridError(f"{out} is not a directory: give the --out of a `densenet reproduce` run")
        recorded = read_grid(out)
        if not isinstance(recorded, dict) or not isinstance(recorded.get("grid"), str) \
                or recorded["grid"] not in GRIDS:
            raise GridError(f"{out}/grid.json is missing or damaged: name the grid, "
                            f"e.g. densenet reproduce status table2 --out {out}")
        name = recorded["grid"]
        try:
            cells = [Cell(str(r), str(s), int(i)) for r, s, i in recorded["cells"]]
        except (TypeError, ValueError):
            raise GridError(f"{out}/grid.json is damaged: name the grid, e.g. "
                            f"densenet reproduce status {name} --out {out}") from None
    states = [cell_state(c.path(out), f"{c.row}/{c.setting}/seed{c.seed}") for c in cells]
    recorded = read_grid(out) if out.is_dir() else None
    tables = []
    if isinstance(recorded, dict) and recorded.get("grid") == name:  # a grid directory of this grid only
        tables = list(write_tables(name, cells, out))
    return states, tables


def status(target: str | None, out: str | Path | None = None, seeds: int = 1,
           only: list[str] | tuple[str, ...] = ()) -> tuple[list, list[Path]]:
    """`densenet reproduce status`: grid_status of a grid directory given as `target` (or as `out`), or,
    where `target` names a grid, of that grid's cells (by seeds and only) in the directory `out`."""
    if target in GRIDS:
        if not out:
            raise GridError(f"status {target} needs --out DIR, the grid directory")
        return grid_status(out, target, seeds, only)
    if not (target or out):
        raise GridError("status needs the grid directory: densenet reproduce status DIR")
    return grid_status(target or out)
