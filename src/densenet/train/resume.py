"""What a resumed run may change: one rule, applied by the engine to every resume (the command line's
`densenet train --resume`, `densenet.train.fit(cfg, resume=RUN)` from Python, a grid's cell).

A resume continues a run exactly. Settings that change what it computes (model, data, recipe, optimiser)
are refused with one line, never silently ignored. Settings of how it runs (`RESUMABLE`: device,
workers, ...) may change. The length (`epochs`) may change with its schedule planned by one rule
(`plan_schedule`): the schedule of the new length must agree with the learning rates the epochs already
done were trained at, or the resume is refused; nothing ever trains on at a rate the schedule no longer
means without saying so.
"""
from __future__ import annotations

import dataclasses
import json

from .config import TrainConfig

# how a run runs, not what it computes: a resumed run may change these
RESUMABLE = ("epochs", "device", "workers", "progress", "tensorboard", "eval_batch_size", "compile",
             "channels_last", "out")
# the learning-rate schedule: compared by plan_schedule, not field by field
SCHEDULE = ("milestones", "milestone_unit", "iterations")


class ResumeError(ValueError):
    """A resume that would not continue the run as it started; the message says what to do instead."""


def _plain(v):
    return json.loads(json.dumps(v, default=list))  # tuples as lists, as config.json holds them


def check_settings(saved: TrainConfig, cfg: TrainConfig, run) -> None:
    """Refuse a resolved `cfg` that differs from the run's resolved `saved` config in a setting outside
    RESUMABLE and SCHEDULE (the model's options named one by one)."""
    for f in dataclasses.fields(TrainConfig):
        name = f.name
        if name in RESUMABLE or name in SCHEDULE:
            continue
        before, after = getattr(saved, name), getattr(cfg, name)
        if name == "model_args" and isinstance(before, dict) and isinstance(after, dict):
            for k in sorted(set(before) | set(after)):
                if _plain(before.get(k)) != _plain(after.get(k)):
                    raise ResumeError(f"--resume continues {run} as it started: its model has {k} = "
                                      f"{before.get(k, '(the default)')}, {after.get(k, '(the default)')!r} given; "
                                      f"drop that option, or start a new run with --out")
        elif _plain(before) != _plain(after):
            flag = "--" + name.replace("_", "-")
            raise ResumeError(f"--resume continues {run} as it started: its {name} is {before!r}, {after!r} "
                              f"given; drop {flag}, or start a new run with --out (a resumed run may change "
                              f"only {', '.join(RESUMABLE[:-1])})")


def recipe_milestones(cfg: TrainConfig, epochs: int) -> tuple[float, ...] | None:
    """The milestones the run's recipe gives a run of `epochs` (the rule `TrainConfig.resolve` applies)."""
    d = {**cfg.to_dict(), "epochs": epochs, "milestones": None, "milestone_unit": None, "iterations": None}
    return TrainConfig.from_dict(d).resolve().milestones


def plan_schedule(saved: TrainConfig, cfg: TrainConfig, epochs_done: int, mid_epoch: bool,
                  run) -> tuple[TrainConfig, str | None]:
    """The resolved config the resumed run trains with, and a line that says how its schedule changed
    (None when it did not).

    With the length unchanged the schedule must be too. With a new length N: where the run's milestones
    were its recipe's, the schedule is planned again by the recipe's rule for N; milestones given anew
    are taken as given. Either way the new schedule must give every epoch already trained (and the one in
    progress) the rate it was trained at; if not, a longer run keeps the old decays (its extra epochs
    continue at the last rate, said so), and a shorter one is refused."""
    if saved.milestone_unit == "iterations" or cfg.milestone_unit == "iterations":
        if _plain([cfg.milestones, cfg.milestone_unit]) != _plain([saved.milestones, saved.milestone_unit]):
            raise ResumeError(f"--resume continues {run} as it started: its schedule decays at iterations "
                              f"{_plain(saved.milestones)}; drop --milestones, or start a new run with --out")
        return cfg, None
    old_n, new_n = saved.epochs, cfg.epochs
    carried = _plain(cfg.milestones) == _plain(saved.milestones)
    if new_n == old_n:
        if carried:
            return cfg, None
        planned, how = cfg.milestones, "as given"
    else:
        by_recipe = recipe_milestones(saved, new_n)
        if (_plain(saved.milestones) == _plain(recipe_milestones(saved, old_n))
                and (carried or _plain(cfg.milestones) == _plain(by_recipe))):
            planned, how = by_recipe, "by the recipe's rule"
        else:
            planned, how = cfg.milestones, "as given"
    new = dataclasses.replace(cfg, milestones=planned)
    old_ms, new_ms = saved.lr_milestones(), new.lr_milestones()
    trained = epochs_done + (1 if mid_epoch else 0)
    if all(saved.learning_rate(e) == new.learning_rate(e) for e in range(trained)):  # the schedule's own rule
        if new_ms == old_ms and new_n == old_n:
            return new, None
        return new, (f"schedule planned {how} for {new_n} epochs: the rate decays after epochs "
                     f"{_epochs(new_ms)} (it was {_epochs(old_ms)} for {old_n} epochs)")
    if new_n > old_n and how == "by the recipe's rule":
        kept = dataclasses.replace(cfg, milestones=saved.milestones)
        return kept, (f"{run} trained {trained} epochs on a {old_n}-epoch schedule (decays after epochs "
                      f"{_epochs(old_ms)}); the recipe's {new_n}-epoch schedule ({_epochs(new_ms)}) disagrees "
                      f"with them, so those decays stay and epochs {old_n + 1}-{new_n} train at the last rate")
    raise ResumeError(f"{run} trained {trained} epoch(s) on a {old_n}-epoch schedule (decays after epochs "
                      f"{_epochs(old_ms)}); the {new_n}-epoch schedule {how} decays after epochs {_epochs(new_ms)}, "
                      f"which those epochs did not follow: resume with --epochs {old_n}, or start a new run "
                      f"with --out")


def _epochs(ms) -> str:
    return "[" + ", ".join(str(int(m)) for m in ms) + "]" if ms else "[] (none)"
