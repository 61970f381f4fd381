"""The parity fuzzer and the shared generators (kdloss.testing): every registered loss's properties
with a small example budget (HYPOTHESIS_PROFILE=fuzz runs the long version), determinism of the CPU
kernels across thread counts, and the fuzzer's failure path (shrunk case, reproducer, exit code)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given

from kdloss import fuzz, testing

from conftest import DEVICES

CASES = [(loss, device, dtype) for loss in testing.names() for device in DEVICES
         for dtype in testing.get(loss).dtypes]


@pytest.mark.parametrize("loss, device, dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_registered_properties(loss, device, dtype):
    @given(testing.get(loss).strategy())
    def prop(case):
        result = testing.check_case(loss, case, device, dtype)
        assert result.ok, f"{result}\n" + "\n".join(result.details)

    prop()


@pytest.mark.parametrize("loss", testing.names())
def test_cpu_kernels_bitwise_deterministic_across_thread_counts(loss):
    @given(testing.get(loss).strategy())
    def prop(case):
        testing.check_determinism(loss, case)

    prop()


def test_fuzz_cli_passes_and_prints_table():
    result = subprocess.run([sys.executable, "-m", "kdloss.fuzz", "--dtype", "float32", "--dtype", "bfloat16",
                             "--examples", "20", "--seed", "3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| margin_mse | cpu | float32 | 20 |" in result.stdout and "PASS" in result.stdout


def test_fuzz_finds_shrinks_and_reproduces_an_injected_bug(monkeypatch):
    spec = testing.get("margin_mse")
    honest = spec.kernel

    def off_by_a_bit(case, *inputs, **constants):  # a wrong kernel: 1e-3 relative error
        return honest(case, *inputs, **constants) * (1 + 1e-3)

    monkeypatch.setattr(spec, "kernel", off_by_a_bit)
    tally = fuzz.fuzz("margin_mse", "cpu", torch.float32, examples=50, seed=0)
    assert not tally.passed and tally.failure is not None
    assert "check_case('margin_mse'" in tally.reproducer
    namespace: dict = {}
    exec(tally.reproducer, namespace)  # the snippet runs as printed and reproduces the failure
    assert not namespace["result"].ok
    assert tally.case["batch"] <= 2 and tally.case["n_neg"] <= 2, tally.case  # hypothesis shrank it
    assert "FAIL" in fuzz.format_table([tally])


def test_fuzz_cli_exit_code_on_failure(tmp_path):
    script = (
        "import sys, kdloss.testing as t\n"
        "spec = t.get('margin_mse'); k = spec.kernel\n"
        "spec.kernel = lambda case, *a, **c: k(case, *a, **c) + 1.0\n"
        "from kdloss.fuzz import main\n"
        "sys.exit(main(['--dtype', 'float64', '--examples', '10']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "minimal reproducer" in result.stdout and "FAIL" in result.stdout
