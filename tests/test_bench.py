"""Smoke test of the benchmark harness (no timing assertions: benchmarks are not tests)."""

import csv
import subprocess
import sys


def test_bench_quick_run_writes_table_and_csv(tmp_path):
    out = tmp_path / "results.csv"
    result = subprocess.run([sys.executable, "-m", "kdloss.bench", "--quick", "--repeat", "1", "--dtype", "float32",
                             "--csv", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| margin_mse | scores | B=64 n=1 | float32 | cpu | kdloss |" in result.stdout
    rows = list(csv.DictReader(out.open()))
    backends = {(r["case"], r["backend"]) for r in rows}
    assert {("scores", "kdloss"), ("scores", "eager"), ("scores", "compile"),
            ("embeddings", "kdloss"), ("embeddings", "sentence-transformers")} <= backends
    assert all(float(r["median_ms"]) > 0 and float(r["peak_mib"]) >= 0 for r in rows)


def test_bench_rss_column(tmp_path):
    out = tmp_path / "results.csv"
    result = subprocess.run([sys.executable, "-m", "kdloss.bench", "--quick", "--repeat", "1", "--dtype", "float32",
                             "--loss", "token_contextual", "--rss", "--csv", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["backend"] for r in rows} == {"kdloss", "eager", "compile"}
    assert all(float(r["peak_rss_mib"]) >= 0 for r in rows)  # measured (NaN would fail), never negative
