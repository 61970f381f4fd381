"""Smoke tests of the benchmark harness and of the docs' generated tables (no timing assertions:
benchmarks are not tests)."""

import csv
import json
import subprocess
import sys

from kdloss.bench import busy_warning, summarize, tables


def test_bench_quick_run_writes_results_machine_and_plot_to_out(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, "-m", "kdloss.bench", "--loss", "margin_mse", "--quick", "--repeat", "2",
                             "--dtype", "float32", "--threads", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| margin_mse | scores | B=64 n=1 | float32 | cpu | kdloss |" in result.stdout
    assert "USDT" not in result.stderr and "profiler_start" not in result.stderr
    assert "--quick shapes are tiny" in result.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    backends = {(r["case"], r["backend"]) for r in rows}
    assert {("scores", "kdloss"), ("scores", "eager"), ("scores", "compile"),
            ("embeddings", "kdloss"), ("embeddings", "sentence-transformers")} <= backends
    for r in rows:
        assert 0 < float(r["min_ms"]) <= float(r["median_ms"]) and float(r["spread"]) >= 0
        assert float(r["peak_mib"]) >= 0 and int(r["threads"]) == 1 and int(r["elements"]) > 0
    assert json.loads((out / "machine.json").read_text())["threads"] == 1
    assert (out / "margin_mse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]  # nothing written to the working directory


def test_bench_rss_column(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kdloss.bench", "--quick", "--repeat", "1", "--dtype", "float32",
                             "--loss", "token_contextual", "--rss", "--no-plot", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["backend"] for r in rows} == {"kdloss", "eager", "compile"}
    assert all(float(r["peak_rss_mib"]) >= 0 for r in rows)  # measured (NaN would fail), never negative


def test_spread_and_busy_machine_warnings():
    timing = summarize([1.0, 1.0, 1.0, 1.0, 50.0])  # one outlier does not make the spread
    assert timing.min_ms == 1.0 and timing.median_ms == 1.0 and timing.spread == 0.0
    assert summarize([1.0, 2.0, 3.0, 4.0, 5.0]).spread == 2.0 / 3.0
    assert busy_warning(load=1.0, threads=1, cores=2) is None
    assert "busy" in busy_warning(load=6.0, threads=1, cores=2)


def _results_run(root, rows, machine):
    run = root / "benchmarks" / "results" / "run1"
    run.mkdir(parents=True)
    from kdloss.bench import CSV_FIELDS, append_csv

    append_csv([{k: row.get(k, "") for k in CSV_FIELDS} for row in rows], run / "results.csv")
    (run / "machine.json").write_text(json.dumps(machine))


def test_tables_script_rewrites_the_marked_block(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    page = docs / "margin_mse.md"
    page.write_text("# Margin-MSE\n\n## Performance\n\nHand-written text stays.\n\n## References\n")
    base = {"loss": "margin_mse", "case": "scores", "shape": "B=64 n=1", "dtype": "float32", "device": "cpu",
            "elements": 128, "threads": 2, "spread": 0.05, "peak_mib": 0.5, "date": "2026-11-29 10:00"}
    _results_run(tmp_path, [{**base, "backend": "kdloss", "min_ms": 0.9, "median_ms": 1.0},
                            {**base, "backend": "eager", "min_ms": 2.9, "median_ms": 3.0}],
                 {"cpu": "Test CPU", "cores": 2, "torch": "2.13.0", "note": "a quiet machine"})
    assert tables.update(tmp_path, check=True) == ["docs/margin_mse.md"]  # --check: out of date, nothing written
    assert "bench:margin_mse" not in page.read_text()
    assert tables.update(tmp_path, check=False) == ["docs/margin_mse.md"]
    text = page.read_text()
    block = text[text.index("<!-- bench:margin_mse:begin -->"):text.index("<!-- bench:margin_mse:end -->")]
    assert "| scores | B=64 n=1 | float32 | cpu | 0.9 / 1 ±5 % | 2.9 / 3 ±5 % | 3.00 | 0.5 / 0.5 |" in block
    assert "Test CPU" in block and "a quiet machine" in block
    assert text.index("## Performance") < text.index("bench:margin_mse:begin") < text.index("Hand-written text")
    assert tables.update(tmp_path, check=True) == []  # idempotent


def test_committed_docs_tables_are_generated_from_committed_results():
    result = subprocess.run([sys.executable, "-m", "kdloss.bench.tables", "--check"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
