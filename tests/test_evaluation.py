"""`densenet eval` (densenet.evaluation): it says which checkpoint it evaluated and why, re-estimates
the BN statistics when asked (--recalibrate-bn) without changing the checkpoint, and refuses an unclear
command in one line."""
from __future__ import annotations

import json

import pytest

from helpers import run_main


def test_eval_recalibrate_bn_and_says_what_it_evaluated(digits_run, capsys):
    files = {p: p.read_bytes() for p in digits_run.rglob("*.safetensors")}
    code, out, err = run_main(capsys, "eval", digits_run, "--split", "val", "--recalibrate-bn", "100", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["recalibrated_bn_images"] == 100 and r["epoch"] == 1 and r["images"] == 32
    # the protocol's checkpoint: digits, like CIFAR, reports the final epoch (last/)
    assert r["checkpoint"].endswith("last/model.safetensors") and r["model"] == "densenet_bc_100_k12"
    assert {p: p.read_bytes() for p in files} == files  # the checkpoint is not changed
    code, out, _ = run_main(capsys, "eval", "--checkpoint", digits_run, "--split", "val", "--recalibrate-bn", "100")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith(f"checkpoint {digits_run}/last/model.safetensors (densenet_bc_100_k12, epoch 1; "
                               f"the protocol's: test_on final); BN statistics re-estimated on 100 training images")
    assert f"top-1 error {r['top1_error']:.2f}%" in lines[1]  # the same numbers: the sample is seeded


@pytest.mark.parametrize("argv, match", [
    ([], "which checkpoint"),
    (["{run}", "--checkpoint", "{run}/last"], "two checkpoints"),
    (["{run}", "--recalibrate-bn", "0"], "--recalibrate-bn takes"),
])
def test_eval_usage_errors(digits_run, capsys, argv, match):
    code, _, err = run_main(capsys, "eval", *[a.format(run=digits_run) for a in argv])
    assert code == 2 and match in err and err.count("\n") == 1
