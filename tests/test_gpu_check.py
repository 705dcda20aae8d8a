"""benchmarks/gpu_check.py stays runnable: a tiny CPU run writes its JSON with the figures it promises."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture
def gpu_check():
    import gpu_check

    return gpu_check


def test_tiny_cpu_run_writes_json_and_table(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--threads", "1", "--sections", "train,real",
                           "--configs", "tv,ours,ours-reference", "--data", str(tmp_path / "none.tar.gz"),
                           "--json", str(out), "--budget-s", "100000"])  # no item cut by the clock
    assert code == 0
    res = json.loads(out.read_text())
    assert res["meta"]["device"] == "cpu" and not res["errors"]
    rows = res["eager_cifar"]
    assert set(rows) == {"tv", "ours", "ours-reference"}
    assert all(r["train_img_s"] > 0 and r["infer_img_s"] > 0 for r in rows.values())
    assert rows["ours"]["train_vs_tv"] == pytest.approx(rows["ours"]["train_img_s"] / rows["tv"]["train_img_s"],
                                                        rel=0.02)
    assert any(s.startswith("real: no CIFAR-10 archive") for s in res["skipped"])
    table = capsys.readouterr().out
    assert "ours-reference" in table and "vs tv" in table


def test_memory_step_counts_a_training_step(gpu_check):
    r = gpu_check.memory_step("ours", "ours", {"fused": True}, 10, 2, "cpu")
    assert r["total_peak_mb"] >= r["before_mb"] > 0


def test_budget_skips_items_instead_of_overrunning(gpu_check, tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--budget-s", "0", "--sections", "train,memory",
                           "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "eager_cifar" not in res and len(res["skipped"]) == 3  # eager cifar, memory at two depths
