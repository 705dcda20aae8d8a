"""densenet.analysis.complexity through `densenet models`: the table and JSON give the multiply-adds
measured and those the papers print."""
from __future__ import annotations

import json

from helpers import run_main


def test_models_table_shows_the_published_gmacs(capsys):
    code, out, _ = run_main(capsys, "models", "resnet50", "resnext50_32x4d", "densenet_bc_100_k12")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("resnet", "resnext", "dense"))}
    assert code == 0
    assert rows["resnet50"][3:5] == ["4.089", "3.8"]  # measured with torchvision's layout; He 2015 prints 3.8
    assert rows["resnext50_32x4d"][3:5] == ["4.230", "4.2"]
    assert rows["densenet_bc_100_k12"][4] == "-"  # the paper prints no FLOPs for the CIFAR networks
    code, out, _ = run_main(capsys, "models", "resnet50", "--json")
    (r,) = json.loads(out)
    assert r["published_gmacs"] == 3.8 and r["paper_gmacs"] == 4.089
