"""``python -m kdloss.selftest``: the CPU pipeline end to end with tiny budgets (one loss), its summary
files, the clean skip of ``--device cuda`` without a GPU, and the stage isolation (a failing or
crashing stage does not stop the others; budgets are enforced)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kdloss import selftest

STATUSES = {"pass", "fail", "skip"}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest-cpu")
    cmd = [sys.executable, "-m", "kdloss.selftest", "--device", "cpu", "--quick", "--loss", "margin_mse",
           "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return result, out


def _check_structure(summary: dict) -> None:
    assert [s["name"] for s in summary["stages"]] == list(selftest.STAGES)
    for stage in summary["stages"]:
        assert stage["status"] in STATUSES, stage
        assert stage["reason"].strip(), stage
        assert stage["seconds"] >= 0 and stage["budget_s"] > 0, stage
    assert summary["exit_code"] == (0 if summary["passed"] else 1)
    assert summary["passed"] == all(s["status"] != "fail" for s in summary["stages"])
    assert {"torch", "gpus", "cpu_count", "cuda_toolkit", "compute_sanitizer"} <= set(summary["environment"])


def test_cpu_pipeline_runs_every_stage_and_writes_the_summary(cpu_run):
    result, out = cpu_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    _check_structure(summary)
    stages = {s["name"]: s for s in summary["stages"]}
    assert {name: s["status"] for name, s in stages.items()} == {
        "build": "pass", "tests": "pass", "fuzz": "pass", "sanitizer": "skip", "bench": "pass"}
    assert {"margin_mse"} == {r["kernel"] for r in stages["build"]["details"]["kernels"]}
    tests = stages["tests"]["details"]
    assert tests["passed"] > 0 and tests["failures"] == 0 and "KDLOSS_TEST_DEVICE" in tests["env"]
    fuzz_runs = stages["fuzz"]["details"]["runs"]
    assert {r["dtype"] for r in fuzz_runs} == {"float64", "float32", "bfloat16", "float16"}
    assert all(r["verdict"] == "PASS" and r["examples"] > 0 for r in fuzz_runs)
    assert "compute-sanitizer" in stages["sanitizer"]["reason"]  # says why it was skipped
    assert stages["sanitizer"]["details"]["probe"]["cases"], "the probe still ran without the sanitizer"
    goals = stages["bench"]["details"]["goals"]
    assert goals and all("median_ms" in g["results"]["kdloss"] for g in goals)
    assert all(g["verdict"].startswith("n/a") for g in goals)  # the goals are for a GPU


def test_cpu_pipeline_markdown_and_log(cpu_run):
    _, out = cpu_run
    markdown = (out / "summary.md").read_text()
    assert markdown.startswith("# kdloss selftest: cpu (quick) — PASS")
    assert "| stage | status | time | budget | reason |" in markdown
    for name in selftest.STAGES:
        assert f"\n| {name} | " in markdown
    assert "## fuzz" in markdown and "| margin_mse | bfloat16 |" in markdown
    assert "## bench" in markdown and "Margin-MSE" in markdown and "≤ 0.030" in markdown  # goal next to result
    log = (out / "selftest.log").read_text()
    assert "===== tests" in log and "===== build" in log


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")
def test_cuda_without_a_gpu_skips_every_stage_with_a_reason(tmp_path, capsys):
    code = selftest.main(["--device", "cuda", "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    _check_structure(summary)
    for stage in summary["stages"]:
        assert stage["status"] == "skip", stage
        assert "CUDA" in stage["reason"], stage
    assert "# kdloss selftest: cuda — PASS" in (tmp_path / "summary.md").read_text()
    assert "needs a CUDA device" in capsys.readouterr().out


def _fake(status, reason="fake"):
    def run(ctx, budget):
        return selftest.StageResult("?", status, reason, 0.0, budget)

    return run


def test_a_failing_or_crashing_stage_does_not_stop_the_others(tmp_path, monkeypatch):
    def crash(ctx, budget):
        raise RuntimeError("boom")

    runners = {"build": _fake("pass"), "tests": crash, "fuzz": _fake("fail", "2 runs failed"),
               "sanitizer": _fake("skip", "no sanitizer"), "bench": _fake("pass")}
    monkeypatch.setattr(selftest, "RUNNERS", runners)
    code = selftest.main(["--device", "cpu", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == 1 and not summary["passed"]
    status = {s["name"]: (s["status"], s["reason"]) for s in summary["stages"]}
    assert status["tests"] == ("fail", "selftest error: RuntimeError: boom")
    assert status["fuzz"][0] == "fail" and status["bench"][0] == "pass"  # ran after the failures


def test_stage_selection_and_total_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(selftest, "RUNNERS", {name: _fake("pass") for name in selftest.STAGES})
    selftest.main(["--device", "cpu", "--out", str(tmp_path), "--stage", "fuzz"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    reasons = {s["name"]: s["reason"] for s in summary["stages"]}
    assert reasons["build"] == "not selected (--stage)" and reasons["fuzz"] == "fake"
    selftest.main(["--device", "cpu", "--out", str(tmp_path), "--total", "1"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all("no time left" in s["reason"] for s in summary["stages"])


def test_a_worker_past_its_budget_is_killed_and_reported(tmp_path):
    ctx = selftest.Context("cpu", True, None, tmp_path / "log", tmp_path)
    rc, seconds, _ = selftest.run_logged([sys.executable, "-c", "import time; time.sleep(60)"], "sleeper", ctx, 1.0)
    assert rc is None and seconds < 30
    stage = selftest._from_worker("fuzz", {"status": "pass", "reason": "3 runs", "final": False}, None, seconds,
                                  "", 1.0)
    assert stage.status == "fail" and "killed after its time budget" in stage.reason
    assert "killed: timeout" in (tmp_path / "log").read_text()


def test_sanitizer_output_is_judged():
    clean = "========= ERROR SUMMARY: 0 errors\n"
    assert selftest._sanitizer_verdict("memcheck", clean, 0, {"status": "pass", "reason": "ran 9"})[0] == "pass"
    bad = ("========= Invalid __global__ read of size 16 bytes\n=========     at kdloss::cuda::fwd_kernel\n"
           "========= ERROR SUMMARY: 1 error\n")
    status, reason, errors = selftest._sanitizer_verdict("memcheck", bad, 86, None)
    assert (status, errors) == ("fail", 1) and "Invalid __global__ read" in reason
    race = "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
    assert selftest._sanitizer_verdict("racecheck", race, 86, None)[:3:2] == ("fail", 1)
    gvisor = "========= Error: Device not supported\n"
    assert selftest._sanitizer_verdict("memcheck", gvisor, 1, None)[0] == "skip"


def test_a_kernel_that_fails_to_build_is_reported_with_its_error():
    rows = []
    selftest._build_group([("no_such_loss", "cpu")], selftest._child_env(), lambda row, output: rows.append(row))
    assert [(r["kernel"], r["status"]) for r in rows] == [("no_such_loss", "fail")]
    assert "no_such_loss" in rows[0]["error"] and "Error" in rows[0]["error"]


def test_goals_are_judged_on_gpu_time_and_memory_and_rendered():
    from kdloss.bench.goals import GOALS

    topk = next(g for g in GOALS if g.loss == "topk_kl")
    assert topk.time_goal_ms("NVIDIA H100 80GB HBM3") == 4.0
    assert abs(topk.time_goal_ms("NVIDIA H200") - 4.0 / 1.4) < 1e-12  # memory-bound: scaled on an H200
    margin = next(g for g in GOALS if g.loss == "margin_mse")
    assert margin.time_goal_ms("NVIDIA H200") == 0.03  # launch-bound: not scaled

    def row(kdloss_result, limit=None):
        return {"results": {"kdloss": kdloss_result}, "goal_ms_here": 2.0, "memory_limit_mib": limit}

    measured = {"median_ms": 2.5, "gpu_ms": 1.5, "extra_mib": 10.0}
    cases = [
        (row(measured), "met"),  # judged on the GPU time, not the launch-bound median
        (row({**measured, "gpu_ms": float("nan")}), "missed: time 2.500 ms > 2.000 ms"),  # no profiler: median
        (row(measured, limit=5.0), "missed: memory 10 MiB > 5 MiB"),
        (row({"error": "RuntimeError: boom"}), "error"),
    ]
    for r, verdict in cases:
        selftest.judge_goal(topk, r, "cuda", "NVIDIA H200", quick=False)
        assert r["verdict"] == verdict
    selftest.judge_goal(topk, r, "cpu", "x86_64 CPU", quick=True)
    assert r["verdict"].startswith("n/a")

    bench = {"device_name": "NVIDIA H200", "goals": [{
        "loss": "topk_kl", "workload": "top-k KL", "shape": "N=16384 V=151936 k=64", "dtype": "bfloat16",
        "goal_ms_h100": 4.0, "goal_ms_here": 2.857, "memory_goal": "within 10%", "memory_limit_mib": 474.8,
        "reference_h100": "eager 55.6 ms", "verdict": "met",
        "results": {"kdloss": {**measured, "peak_mib": 4758.0}, "eager": {"median_ms": 40.1},
                    "compile": {"skipped": "budget spent (12 s left)"}, "liger-fljsd": {"error": "ImportError: x"}}}]}
    summary = {"device": "cuda", "quick": False, "command": "python -m kdloss.selftest", "started": "now",
               "seconds": 1.0, "total_budget_s": 465.0, "passed": True, "exit_code": 0,
               "environment": selftest.environment(),
               "stages": [{"name": "bench", "status": "pass", "reason": "1 of 1 goals met", "seconds": 1.0,
                           "budget_s": 110.0, "details": bench}]}
    markdown = selftest.render_markdown(summary)
    line = next(ln for ln in markdown.splitlines() if ln.startswith("| top-k KL |"))
    assert "≤ 4.000 | ≤ 2.857 | 2.500 | 1.500 | 10.0 |" in line and "skipped (budget spent" in line
    assert "liger-fljsd error: ImportError: x" in line and line.endswith("| met |")


def test_tests_stage_runs_every_cuda_test_on_a_gpu_and_test_cuda_on_the_cpu(tmp_path):
    gpu = selftest.Context("cuda", False, ["topk_kl"], tmp_path / "log", tmp_path)
    cmd, env = selftest.pytest_command(gpu, tmp_path / "junit.xml")
    assert "-m cuda" in " ".join(cmd) and str(selftest.TESTS_DIR) in cmd and env["KDLOSS_TEST_DEVICE"] == "cuda"
    assert cmd[cmd.index("-k") + 1] == "(topk_kl)"
    cpu = selftest.Context("cpu", True, None, tmp_path / "log", tmp_path)
    cmd, env = selftest.pytest_command(cpu, tmp_path / "junit.xml")
    assert str(selftest.TESTS_DIR / "test_cuda.py") in cmd and env["KDLOSS_TEST_DEVICE"] == "cpu"
