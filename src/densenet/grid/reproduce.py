"""Named experiment grids: every cell an ordinary training run with the paper's recipe, the results
tabulated beside the published numbers.

    OUT/<row>/<setting>/seed<i>/   a run directory of `densenet train` (resumable)
    OUT/results.md, OUT/results.csv

A cell whose run directory holds summary.json is done and skipped; one with a checkpoint is resumed;
the others start. Interrupting the grid and running the same command again continues it.
"""
from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..utils.atomic import write_text_atomic
from ..utils.validate import number_field, read_json
from ..paper import SETTING_DATA, TABLE2, TABLE2_BY_KEY, TABLE2_ROWS, TABLE2_SETTINGS, published_error


@dataclass(frozen=True)
class Cell:
    row: str  # a row of Table 2 (paper.TABLE2_BY_KEY), or any registered model name
    setting: str  # C10, C10+, C100, C100+, SVHN
    seed: int

    @property
    def published(self) -> float | None:
        return published_error(self.row, self.setting)

    @property
    def model(self) -> str:
        """The registered network the row trains in its setting (stochastic depth's 152 layers on SVHN)."""
        r = TABLE2_BY_KEY.get(self.row)
        return r.model_for(self.setting) if r is not None and r.model else self.row

    def recipe(self):
        """The row's recipe for its setting, complete (`recipes.recipe_for`): the row's own paper's where
        Table 2 names one (the constant-depth ResNet of stochastic depth), else its model's."""
        from ..recipes import recipe_for

        dataset = SETTING_DATA[self.setting][0]
        r = TABLE2_BY_KEY.get(self.row)
        name = f"{r.recipe}-{'svhn' if dataset == 'svhn' else 'cifar'}" if r is not None and r.recipe else "auto"
        return recipe_for(self.model, dataset, name)

    def path(self, out: Path) -> Path:
        return out / self.row / self.setting / f"seed{self.seed}"


GRIDS: dict[str, dict] = {
    "table2": {"rows": list(TABLE2), "settings": list(TABLE2_SETTINGS),
               "about": "Table 2: the six DenseNet configurations on C10, C10+, C100, C100+ and SVHN"},
    "resnet-vs-densenet": {"rows": ["densenet_bc_100_k12", "densenet_bc_250_k24", "densenet_bc_190_k40",
                                    "resnet110", "preact_resnet164", "preact_resnet1001"],
                           "settings": ["C10+"],
                           "about": "parameter efficiency on C10+ (Figure 4 middle): DenseNet-BC against "
                                    "(pre-activation) ResNets of similar and larger size"},
    "table2-baselines": {"rows": [r.key for r in TABLE2_ROWS if r.model and r.key not in TABLE2],
                         "settings": list(TABLE2_SETTINGS),
                         "about": "Table 2's baselines (ResNet, stochastic depth, Wide ResNet, pre-activation "
                                  "ResNet), each with its own paper's recipe, where the paper reports a number"},
}


def grid_cells(name: str, seeds: int = 1, only_published: bool = True) -> list[Cell]:
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}: choose one of {', '.join(GRIDS)}")
    g = GRIDS[name]
    cells = []
    for row in g["rows"]:
        for setting in g["settings"]:
            if only_published and row in TABLE2_BY_KEY and published_error(row, setting) is None:
                continue  # the paper reports nothing to compare with (DenseNet-BC-190 on C10)
            cells += [Cell(row, setting, s) for s in range(seeds)]
    return cells


def cell_config(cell: Cell, data: dict[str, str], epochs: int | None, budget: float | None, out: Path,
                extra: dict | None = None):
    """The TrainConfig of a cell: its row's recipe for the setting (the row's own paper's, see
    densenet.recipes.recipe_for), optionally scaled, and the protocol of the published number: the setting's
    augmentation (a recipe's own augmented one, WRN's reflection-padded crops, where the setting is
    augmented); a run on all of train where the recipe tests the final weights (the papers' numbers on
    CIFAR), else the recipe's hold-out; images given as a folder (no test split) hold out the dataset's."""
    from ..recipes import dataset_recipe
    from ..train.config import TrainConfig

    dataset, augment = SETTING_DATA[cell.setting]
    rec = cell.recipe()
    if augment != "none" and rec.augment != "none":
        augment = rec.augment  # e.g. WRN's reflection-padded crops
    path = data.get(dataset)
    kind = dataset
    if path is not None and (str(path).endswith((".tar.gz", ".tgz", ".tar")) or (Path(path) / "train").is_dir()):
        kind = "folder"  # e.g. the CIFAR-10 training images as a folder archive
    n_epochs = epochs
    if budget and not epochs:  # a fraction of the row's own recipe (WRN 200 epochs, stochastic depth 500, ...)
        full = TrainConfig(model=cell.model, dataset=dataset, recipe=rec.name, val_size=0).resolve().epochs
        n_epochs = max(1, round(full * budget))
    settings = dict(model=cell.model, dataset=kind, data=path, augment=augment, epochs=n_epochs, seed=cell.seed,
                    out=str(cell.path(out)), progress=False, recipe=rec.name)
    if kind == "folder":  # no test split (the CIFAR-10 images given here): report validation error
        settings["val_size"] = dataset_recipe(dataset).val_size
    else:  # CIFAR: the paper's test error is of a run on all 50,000 images; stochastic depth: 45k/5k, best
        settings["val_size"] = 0 if rec.test_on == "final" else rec.val_size

    settings.update(extra or {})
    cfg = TrainConfig(**settings)
    if kind == "folder":  # the setting's images as a folder (the CIFAR-10 archive): their number is known
        full = TrainConfig(dataset=dataset, val_size=cfg.val_size, train_subset=cfg.train_subset)
        return cfg.resolve(train_images=full.known_train_images())
    return cfg.resolve()


def describe(cell: Cell, cfg) -> str:
    """The cell's recipe in one line: network, batch, length, schedule, weight decay, dropout, data,
    validation, published number."""
    length = (f"{cfg.iterations:,} it ({cfg.epochs} ep)" if cfg.milestone_unit == "iterations" and cfg.epochs
              else f"{cfg.iterations:,} it" if cfg.milestone_unit == "iterations" else f"{cfg.epochs} ep")
    ms = ",".join(f"{int(m):,}" if m >= 1000 else str(int(m)) for m in cfg.milestones or ())
    warm = f" warm-up {cfg.warmup_lr:g}x{cfg.warmup_iterations}it" if cfg.warmup_iterations else ""
    extra = "".join([", momentum reset at each decay" if cfg.reset_momentum_at_decay else "",
                     ", last partial batch dropped" if cfg.drop_last else ""])
    data = f", data {cfg.normalize}" if cfg.normalize else ""  # ZCA, per-pixel, per-channel
    every = f" every {cfg.val_every_iterations} it" if cfg.val_every_iterations else ""
    pub = cell.published
    return (f"network {cfg.model}; recipe {cfg.recipe}: batch {cfg.batch_size}, {length}, lr {cfg.lr:g} "
            f"x{cfg.lr_gamma:g} after {ms} {'it' if cfg.milestone_unit == 'iterations' else 'ep'}{warm}, "
            f"{'nesterov ' if cfg.nesterov else ''}momentum {cfg.momentum:g}{extra}, wd {cfg.weight_decay:g}, "
            f"dropout {cfg.drop_rate:g}{data}, val {cfg.val_size}{every}, test {cfg.test_on}; "
            f"published {'-' if pub is None else f'{pub:.2f}'}")


# cells whose published number has no recipe of its authors: besides Table 2's "*" cells (the DenseNet
# authors ran the pre-activation ResNets without augmentation), the 1202-layer network with stochastic depth,
# whose code was not released (Stochastic_Depth README: "easily modified from the repo fb.resnet.torch")
NO_RECIPE_NOTES: dict[str, str] = {
    "resnet1202_stochdepth": "Huang et al. 2016 trained it with fb.resnet.torch modified, not released "
                             "(yueatsprograms/Stochastic_Depth README.md:4 @86b5cdd); here the 110-layer CIFAR recipe",
}


def cell_sources(cell: Cell, cfg) -> tuple[str, ...]:
    """Where the cell's recipe comes from: each source of its recipe in one line (recipes.Source.text)."""
    from ..recipes import recipe_for

    return tuple(src.text() for src in recipe_for(cfg.model, SETTING_DATA[cell.setting][0], cfg.recipe).sources)


def cell_departures(cell: Cell, cfg) -> tuple[str, ...]:
    """Every place the cell's protocol departs from its sources: no published recipe (Table 2's "*" cells,
    NO_RECIPE_NOTES), the recipe's and the network's departures (recipes.departures)."""
    from ..recipes import NO_PUBLISHED_RECIPE, departures

    r = TABLE2_BY_KEY.get(cell.row)
    out = []
    if r is not None and (cell.setting in r.starred or cell.row in NO_RECIPE_NOTES):
        note = NO_RECIPE_NOTES.get(cell.row, "Table 2 marks it '*'; here the network's own recipe")
        out.append(f"{NO_PUBLISHED_RECIPE} ({note})")
    return tuple(out) + departures(cfg.model, SETTING_DATA[cell.setting][0], cfg.recipe)


def cost(cell_cfg, macs_per_image: int, train_images: int) -> float:
    """Multiply-adds of the whole run: forward and backward ~ 3 forward passes per image per epoch."""
    return 3.0 * macs_per_image * train_images * cell_cfg.epochs


def status(cell: Cell, out: Path) -> str:
    d = cell.path(out)
    if (d / "summary.json").is_file():
        return "done"
    if (d / "last").exists():
        return "partial"
    return "todo"


def result(cell: Cell, out: Path) -> tuple[float, str] | None:
    f = cell.path(out) / "summary.json"
    if not f.is_file():
        return None
    s = read_json(f)  # a damaged summary is an error naming it
    for key, split in (("test_top1_error", "test"), ("val_top1_error", "val")):
        err = number_field(s, key, f)
        if err is not None:
            return err, split
    return None


def write_tables(name: str, cells: list[Cell], out: Path) -> tuple[Path, Path]:
    """results.md and results.csv: each measured error (mean +- std over seeds) beside the published."""
    settings = list(dict.fromkeys(c.setting for c in cells))
    rows = list(dict.fromkeys(c.row for c in cells))
    csv_rows, md = [], [f"# {name}: measured error (%) beside the paper's\n",
                        GRIDS[name]["about"] + ". Each cell: measured (published, difference); "
                        "'val' marks a validation error where the data has no test split.\n",
                        "| network | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for row in rows:
        line = [row]
        for setting in settings:
            group = [c for c in cells if c.row == row and c.setting == setting]
            found = [r for r in (result(c, out) for c in group) if r is not None]
            pub = group[0].published if group else None
            if not found:
                line.append("-" if not group else f"not run ({pub:.2f})" if pub is not None else "not run")
                continue
            errs = [e for e, _ in found]
            mean = statistics.fmean(errs)
            sd = statistics.stdev(errs) if len(errs) > 1 else None
            split = found[0][1]
            text = f"{mean:.2f}" + (f" ± {sd:.2f}" if sd is not None else "") + (" val" if split == "val" else "")
            if pub is not None:
                text += f" ({pub:.2f}, {mean - pub:+.2f})"
            line.append(text)
            csv_rows.append({"network": row, "setting": setting, "measured": round(mean, 4),
                             "std": None if sd is None else round(sd, 4), "runs": len(errs), "split": split,
                             "published": pub, "difference": None if pub is None else round(mean - pub, 4)})
        md.append("| " + " | ".join(line) + " |")
    if name.startswith("table2"):  # the methods this package does not train: their published numbers alone
        md += ["", "Other methods of Table 2 (published only):", "",
               "| method | depth | params | " + " | ".join(settings) + " |", "|---|---|---|" + "---|" * len(settings)]
        for r in TABLE2_ROWS:
            if r.model is None:
                md.append(f"| {r.label} | {r.depth or '-'} | {r.params or '-'} | "
                          + " | ".join(f"{r.errors[s]:.2f}" if s in r.errors else "-" for s in settings) + " |")
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / "results.md", out / "results.csv"
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, ["network", "setting", "measured", "std", "runs", "split", "published", "difference"])
    w.writeheader()
    w.writerows(csv_rows)
    write_text_atomic(md_path, "\n".join(md) + "\n")
    write_text_atomic(csv_path, table.getvalue())
    return md_path, csv_path
