"""Runs every script in examples/ as a user would (a subprocess, the DDP one under torchrun with
2 gloo processes) with a few steps, and checks its printed loss curve and its plot."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
STEPS = 3
STEP_LINE = re.compile(r"^step (\d+) loss (\S+)", re.MULTILINE)

# script -> number of curves it prints (one "step i loss L" line per step and curve)
SCRIPTS = {
    "llm_trainer_online_teacher.py": 1,
    "llm_trainer_stored_topk.py": 1,
    "llm_fused_head.py": 1,
    "ddp_torchrun.py": 1,
    "sentence_transformers_margin_mse.py": 1,
    "sentence_transformers_pld.py": 2,
    "vit_trg_sinkd.py": 1,
    "quickstart.py": 1,  # the README's Quick start
}


def run_example(script: str, out: Path) -> subprocess.CompletedProcess:
    command = [str(EXAMPLES / script), "--steps", str(STEPS), "--out", str(out)]
    if script == "ddp_torchrun.py":
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, timeout=300,
                          cwd=out)


@pytest.fixture(scope="module")
def example_runs(request):
    """Runs every selected example: the 2-process DDP one alone, then the single-threaded others
    two at a time (2 cores). ``{script: (future of the CompletedProcess, output folder)}``."""
    selected = {item.callspec.params["script"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_example_runs"}
    root = Path(tempfile.mkdtemp(prefix="kdloss_examples_"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {}
        for script in sorted(selected, key=lambda s: s != "ddp_torchrun.py"):
            out = root / script.removesuffix(".py")
            out.mkdir()
            runs[script] = (pool.submit(run_example, script, out), out)
            if script == "ddp_torchrun.py":
                runs[script][0].exception()  # wait: it already uses both cores
        yield runs


# examples run by other test files
TESTED_ELSEWHERE = {"teacher_cache.py": "tests/test_cache.py"}


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(SCRIPTS) | set(TESTED_ELSEWHERE)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs(script, example_runs):
    future, out = example_runs[script]
    result = future.result()
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    steps = STEP_LINE.findall(result.stdout)
    assert len(steps) == STEPS * SCRIPTS[script], result.stdout
    assert [int(s) for s, _ in steps] == list(range(1, STEPS + 1)) * SCRIPTS[script]
    losses = [float(value) for _, value in steps]
    assert all(math.isfinite(v) and v >= 0 for v in losses), losses
    plot = out / "loss.png"
    assert f"plot: {plot}" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if script == "ddp_torchrun.py":  # the printed DDP-vs-single-process gradient check
        match = re.search(r"max \|diff\| (\S+) \(largest gradient entry (\S+)\)", result.stdout)
        assert match, result.stdout
        assert float(match.group(1)) <= 1e-5 * float(match.group(2))
    if script == "quickstart.py":  # the stored teacher and the kdloss-vs-eager timing
        assert (out / "teacher_topk.pt").exists()
        kernel_ms, eager_ms = map(float, re.search(r"kdloss (\S+) ms, eager (\S+) ms", result.stdout).groups())
        assert kernel_ms > 0 and eager_ms > 0
    if script == "sentence_transformers_margin_mse.py":  # kdloss and sentence-transformers on one batch
        ours, theirs = map(float, re.search(r"kdloss (\S+), sentence-transformers (\S+)", result.stdout).groups())
        assert ours == pytest.approx(theirs, rel=1e-5)


def test_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    import _common

    _common.report({"loss": [2.0, 1.0]}, str(tmp_path), "title")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["loss: 2.0000 -> 1.0000 over 2 steps",
                     "plot skipped: matplotlib is not installed (pip install 'kdloss[examples]')"]
    assert not list(tmp_path.iterdir())
