"""benchmarks/gpu_check.py stays runnable: a tiny CPU run writes its JSON with the figures it promises, and
a failing configuration, a failing or hanging test run, or a spent budget costs only what it must."""
from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TINY = ["--device", "cpu", "--tiny", "--threads", "1", "--budget-s", "100000"]  # no item cut by the clock


@pytest.fixture
def gpu_check(monkeypatch):
    # bench_densenet (imported by gpu_check) sets this at its first import: restored after the test
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384"))
    import gpu_check

    return gpu_check


def test_tiny_cpu_run_writes_json_and_table(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    code = gpu_check.main([*TINY, "--sections", "train,real", "--configs", "tv,ours,ours-reference",
                           "--data", str(tmp_path / "none.tar.gz"), "--json", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["meta"]["device"] == "cpu" and not res["errors"]
    rows = res["eager_cifar"]
    assert set(rows) == {"tv", "ours", "ours-reference"}
    for r in rows.values():
        assert r["train_img_s"] > 0 and r["infer_img_s"] > 0 and r["first_step_s"] > 0 and r["rounds"] >= 1
        assert r["train_img_s_min"] <= r["train_img_s"] <= r["train_img_s_max"]
        assert r["warmup_steps"] <= 2  # --tiny: a couple of steps
    assert rows["ours"]["train_vs_tv"] == pytest.approx(rows["ours"]["train_img_s"] / rows["tv"]["train_img_s"],
                                                        rel=0.02)
    v = res["verdict"]  # formed from the fp32 pair, marked as no evidence at these sizes
    assert v["rule"] in ('FUSED_BY_DEVICE["cpu"] = True', 'FUSED_BY_DEVICE["cpu"] = False') and "tiny" in v["note"]
    assert list(res).index("verdict") == list(res).index("eager_cifar") + 1  # written right after the eager rows
    assert any(s.startswith("real: no CIFAR-10 archive") for s in res["skipped"])
    table = capsys.readouterr().out
    assert "ours-reference" in table and "vs tv" in table and "OK: nothing failed" in table


def test_a_failing_configuration_is_recorded_and_the_rest_runs(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    code = gpu_check.main([*TINY, "--sections", "train,memory", "--configs", "tv,ours,ours-reference,ours-memeff",
                           "--memory-depths", "10", "--fail-config", "ours-memeff", "--json", str(out)])
    assert code == 1
    res = json.loads(out.read_text())
    assert set(res["errors"]) == {"eager_cifar/ours-memeff", "memory/L=10/ours-memeff"}
    assert res["errors"]["eager_cifar/ours-memeff"].startswith("ForcedFailure: --fail-config ours-memeff")
    assert "Traceback" in res["errors"]["eager_cifar/ours-memeff"]
    assert set(res["eager_cifar"]) == {"tv", "ours", "ours-reference"}
    assert all(r["train_img_s"] > 0 for r in res["eager_cifar"].values())
    mem = res["memory"]["10"]
    assert set(mem) == {"tv", "ours", "ours-reference"} and all(r["peak_mb"] > 0 for r in mem.values())
    assert res["verdict"]["rule"] is not None  # ours-memeff is not one of the verdict's rows
    last = capsys.readouterr().out.strip().splitlines()
    assert "FAILED eager_cifar/ours-memeff" in "\n".join(last[-4:])
    assert last[-1] == "# FAILED: eager_cifar/ours-memeff, memory/L=10/ours-memeff"


def test_a_failing_verdict_row_leaves_a_verdict_that_says_so(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    code = gpu_check.main([*TINY, "--sections", "train", "--configs", "tv,ours,ours-reference",
                           "--fail-config", "ours", "--json", str(out)])
    assert code == 1
    res = json.loads(out.read_text())
    assert set(res["errors"]) == {"eager_cifar/ours"} and set(res["eager_cifar"]) == {"tv", "ours-reference"}
    v = res["verdict"]
    assert v["rule"] is None and "eager_cifar/ours: failed" in v["why"]
    assert "no verdict" in capsys.readouterr().out


def test_memory_step_counts_a_training_step(gpu_check):
    r = gpu_check.memory_step("ours", "ours", {"fused": True}, 10, 2, "cpu")
    assert r["total_peak_mb"] >= r["before_mb"] > 0


def test_budget_skips_items_instead_of_overrunning(gpu_check, tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--budget-s", "0", "--sections", "train,memory",
                           "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "eager_cifar" not in res and len(res["skipped"]) == 3  # eager cifar, memory at two depths
    assert res["verdict"]["rule"] is None and "not measured" in res["verdict"]["why"]


@pytest.fixture
def fake_tests(gpu_check, tmp_path, monkeypatch):
    """The tests section pointed at a small test file of its own (a pass, a failure, stderr noise, and a
    hanging test where asked), with a conftest that takes --device as tests/conftest.py does."""
    def make(hang: bool):
        d = tmp_path / ("hang" if hang else "plain")
        d.mkdir()
        (d / "conftest.py").write_text(textwrap.dedent("""
            import sys
            def pytest_addoption(parser):
                parser.addoption("--device", default="cpu")
            print("noise on stderr: 1 passed in 0.01s", file=sys.stderr)
        """))
        body = "def test_pass():\n    pass\n\ndef test_fail():\n    assert False\n"
        if hang:
            body += "\ndef test_hang():\n    import time\n    time.sleep(60)\n"
        (d / "test_fake.py").write_text(body)
        monkeypatch.setattr(gpu_check, "TEST_FILES", [str(d / "test_fake.py")])
    return make


def test_tests_section_counts_from_stdout_and_fails_the_run(gpu_check, fake_tests, tmp_path):
    fake_tests(hang=False)
    out = tmp_path / "check.json"
    assert gpu_check.main([*TINY, "--sections", "tests", "--json", str(out)]) == 1
    res = json.loads(out.read_text())
    t = res["tests"]
    assert t["counts"] == {"failed": 1, "passed": 1} and not t["timed_out"] and t["returncode"] == 1
    assert [f.split("::")[-1] for f in t["failed"]] == ["test_fail"]
    assert "test_fail" in res["errors"]["tests"]


def test_tests_section_timeout_is_a_failure_with_what_ran(gpu_check, fake_tests, tmp_path):
    fake_tests(hang=True)
    out = tmp_path / "check.json"
    t0 = time.perf_counter()
    assert gpu_check.main([*TINY, "--sections", "tests", "--tests-s", "10", "--json", str(out)]) == 1
    assert time.perf_counter() - t0 < 45  # 10 s cap (the child pytest starts in ~2 s, more on a loaded machine)
    res = json.loads(out.read_text())
    t = res["tests"]
    assert t["timed_out"] and t["counts"] == {"passed": 1, "failed": 1}
    assert [f.split("::")[-1] for f in t["failed"]] == ["test_fail"]
    assert res["errors"]["tests"].startswith("timed out after 10 s")


def test_pytest_summary_line(gpu_check):
    out = "x.py::a PASSED\n\n==== short test summary info ====\nFAILED x.py::b - assert\n" \
          "==== 1 failed, 12 passed, 3 deselected, 1 error, 2 warnings in 9.81s ====\n"
    counts, line = gpu_check.pytest_summary(out)
    assert counts == {"failed": 1, "passed": 12, "deselected": 3, "errors": 1, "warnings": 2}
    assert line == "1 failed, 12 passed, 3 deselected, 1 error, 2 warnings in 9.81s"
    assert gpu_check.pytest_summary("collecting ...\n") == ({}, None)


def test_alarm_cuts_an_overrunning_item(gpu_check):
    t0 = time.perf_counter()
    with pytest.raises(gpu_check.BudgetExceeded):
        with gpu_check.alarm(1):
            time.sleep(10)
    assert time.perf_counter() - t0 < 5
