"""The parity fuzzer and the shared generators (kdloss.testing): every registered loss's properties
with a small example budget (HYPOTHESIS_PROFILE=fuzz runs the long version), determinism of the CPU
kernels across thread counts, and the fuzzer's failure path (shrunk case, reproducer, exit code)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given

from kdloss import fuzz, testing

from helpers import DEVICES

CASES = [(loss, device, dtype) for loss in testing.names() for device in DEVICES
         for dtype in testing.get(loss).dtypes]


@pytest.mark.parametrize("loss, device, dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_registered_properties(loss, device, dtype):
    @given(testing.get(loss).strategy())
    def prop(case):
        result = testing.check_case(loss, case, device, dtype)
        assert result.ok, f"{result}\n" + "\n".join(result.details)

    prop()


# Cases large enough that every CPU kernel's parallel_for splits into several tasks at 2 and 3 threads:
# row_grain(w) = ceil(16384 / w) rows per task (SinKD's passes: at least 2^18 / w), so each case below
# has several times 3·16384 units of work in every parallel loop. Small fuzz cases would fit in one
# task and compare a single-threaded run with itself.
THREADED_CASES = {
    "margin_mse": [
        {"kind": "scores", "batch": 9000, "n_neg": 7, "dim": 1, "teacher": "scores", "reduction": "mean",
         "layout": "contiguous", "magnitude": 1.0, "seed": 1},
        {"kind": "embeddings", "batch": 600, "n_neg": 7, "dim": 64, "teacher": "margins", "reduction": "sum",
         "layout": "strided", "magnitude": 1.0, "seed": 2},
    ],
    "topk_kl": [
        {"rows": 40, "split": True, "vocab": 4500, "k": 32, "pad": 2, "values": "logprobs", "tail": "bucket",
         "support": "full", "temperature": 2.0, "teacher_temperature": 1.5, "scale_by_t2": True, "labels": "some",
         "num_items": None, "reduction": "mean", "layout": "rows", "magnitude": 8.0, "student_pad": 3,
         "quantised": False, "seed": 3},
    ],
    "fused_linear_topk_kl": [
        {"rows": 64, "hidden": 16, "vocab": 1100, "k": 8, "pad": 1, "values": "logprobs", "tail": "renorm",
         "support": "full", "temperature": 2.0, "teacher_temperature": 1.0, "scale_by_t2": True,
         "labels": "some", "num_items": None, "reduction": "mean", "bias": True, "softcap": 30.0,
         "chunk_size": None, "magnitude": 1.0, "quantised": False, "seed": 4},
    ],
    "sinkhorn": [
        {"batch": 1100, "batch_t": 300, "classes": 4, "temperature": 2.0, "epsilon": 0.1, "n_iters": 5,
         "scale": 1.0, "layout": "contiguous", "magnitude": 1.0, "seed": 5},
    ],
    "plackett_luce": [
        {"lead": [600], "classes": 300, "ties": True, "ignore": 0.3, "permutation": False, "temperature": 1.0,
         "reduction": "mean", "layout": "contiguous", "magnitude": 5.0, "seed": 6},
    ],
    "token_contextual": [
        {"batch": 2, "tokens": 150, "ds": 19, "dt": 11, "reduction": "mean", "layout": "contiguous",
         "magnitude": 1.0, "seed": 7},
    ],
    "token_graph": [
        {"nodes": 600, "ds": 16, "dt": 16, "k": 8, "graph": "teacher", "sigma": 8.0, "edge": "kernel",
         "kl_direction": "student_teacher", "reduction": "mean", "layout": "contiguous", "magnitude": 1.0,
         "seed": 8},
    ],
    "token_contrastive": [
        {"nodes": 600, "dim": 24, "temperature": 0.1, "similarity": "cosine", "symmetric": True,
         "detach_teacher": False, "reduction": "mean", "layout": "contiguous", "magnitude": 1.0, "seed": 9},
    ],
}


@pytest.mark.parametrize("loss", testing.names())
def test_cpu_kernels_bitwise_deterministic_across_thread_counts(loss):
    assert loss in THREADED_CASES, f"add a case that splits across threads for {loss}"
    for case in THREADED_CASES[loss]:
        testing.check_determinism(loss, case)


def test_fuzz_cli_passes_and_prints_table():
    result = subprocess.run([sys.executable, "-m", "kdloss.fuzz", "--dtype", "float32", "--dtype", "bfloat16",
                             "--examples", "20", "--seed", "3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| margin_mse | cpu | float32 | 20 |" in result.stdout and "PASS" in result.stdout
    cells = len(fuzz.cells(None, ["cpu"], ["float32", "bfloat16"]))
    progress = [line for line in result.stdout.splitlines() if line.startswith("[") and " cases in " in line]
    assert len(progress) == cells and progress[-1].startswith(f"[{cells}/{cells}]"), result.stdout


def test_fuzz_minutes_is_a_total_budget_shared_by_the_cells(monkeypatch, capsys):
    clock = {"now": 0.0}
    budgets = []

    def fake_fuzz(loss, device, dtype, *, examples=None, minutes=None, seed=0):
        budgets.append(minutes)
        clock["now"] += 60 * minutes / 2 if loss == "margin_mse" else 60 * minutes  # margin_mse uses half
        tally = fuzz.Tally(loss, device, dtype)
        tally.examples = 10
        return tally

    monkeypatch.setattr(fuzz, "fuzz", fake_fuzz)
    monkeypatch.setattr(fuzz, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    assert fuzz.main(["--loss", "margin_mse", "--loss", "token_graph", "--dtype", "float32", "--dtype", "float64",
                      "--minutes", "8"]) == 0
    # 4 cells share 8 minutes: each gets what is left over the cells still to run, so the half that the
    # margin_mse cells leave unused goes to the token_graph cells, and the run ends on budget
    assert budgets == pytest.approx([8 / 4, 7 / 3, 35 / 12, 35 / 12])
    assert clock["now"] == pytest.approx(60 * 8)
    out = capsys.readouterr().out
    assert "4 cells, 8 minutes in all" in out and out.count(" cases in ") == 4


def test_fuzz_cell_with_no_time_left_runs_one_chunk():
    assert fuzz.fuzz("margin_mse", "cpu", torch.float64, minutes=0.0).examples == 10


def test_fuzz_without_hypothesis_says_how_to_install_it():
    script = "import sys; sys.modules['hypothesis'] = None\nfrom kdloss.fuzz import main\nsys.exit(main([]))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pip install 'kdloss[fuzz]'" in result.stderr


def test_fuzz_help_is_complete():
    result = subprocess.run([sys.executable, "-m", "kdloss.fuzz", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert "--long" in result.stdout and "pip install 'kdloss[fuzz]'" in result.stdout  # the docstring's last line


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


# Minimal failing cases the long run (`python -m kdloss.fuzz --examples 3000 --seed 5 / 8191`) found;
# causes and fixes in docs/verifying.md ("Cancellation"). Each failed by 1.4-2.5x before the fix.
LONG_RUN_CASES = [
    ("margin_mse", torch.float32,  # ∂L/∂s⁺ = 2Σe cancels; ⟨q, p⟩'s rounding counted n times (fp32 dot products)
     {"kind": "embeddings", "batch": 1, "n_neg": 52, "dim": 52, "teacher": "scores", "reduction": "sum",
      "layout": "contiguous", "magnitude": 1.0, "seed": 1}),
    ("margin_mse", torch.float32,  # e = s⁺ − s⁻ − m is 60x smaller than the dot products
     {"kind": "embeddings", "batch": 1, "n_neg": 1, "dim": 62, "teacher": "scores", "reduction": "mean",
      "layout": "contiguous", "magnitude": 30.0, "seed": 460857}),
    ("token_graph", torch.float32,  # log-softmax rounded at the scale of |max logit|, then r − KL cancels
     {"nodes": 3, "ds": 37, "dt": 1, "k": 2, "graph": "teacher", "sigma": 0.5, "edge": "log_kernel",
      "kl_direction": "student_teacher", "reduction": "mean", "layout": "contiguous", "magnitude": 1.0, "seed": 1}),
    ("token_graph", torch.float64,
     {"nodes": 7, "ds": 41, "dt": 48, "k": 3, "graph": "teacher", "sigma": 0.5, "edge": "log_kernel",
      "kl_direction": "student_teacher", "reduction": "sum", "layout": "contiguous", "magnitude": 3.0, "seed": 1}),
    ("token_contrastive", torch.float64,  # E = 1: the exact gradient is 0; F.normalize's autograd left 1.9e-9
     {"nodes": 31, "dim": 1, "temperature": 0.05, "similarity": "cosine", "symmetric": False,
      "detach_teacher": False, "reduction": "mean", "layout": "contiguous", "magnitude": 0.1, "seed": 339}),
    ("token_contrastive", torch.float32,  # a confident row: p_ii − 1 cancelled in fp32 (seed 2718, 1.12x)
     {"nodes": 2, "dim": 2, "temperature": 0.05, "similarity": "cosine", "symmetric": False,
      "detach_teacher": False, "reduction": "mean", "layout": "contiguous", "magnitude": 0.1, "seed": 593}),
    ("topk_kl", torch.float32,  # a confident row: 127 fp32 additions onto a lane holding exp(0) (seed 1618, 1.7x)
     {"rows": 1, "split": False, "vocab": 2084, "k": 1, "pad": 0, "values": "logprobs", "tail": "renorm",
      "support": "full", "temperature": 3.7, "teacher_temperature": 1.0, "scale_by_t2": True, "labels": None,
      "num_items": None, "reduction": "sum", "layout": "contiguous", "magnitude": 1.0, "confident": True,
      "student_pad": 0, "quantised": False, "seed": 0, "shifted": False, "precompute_grad": None}),
    ("fused_linear_topk_kl", torch.float32,  # T = 1000, T²: the teacher's p̂ rounded to fp32 (seed 31415, 1.16x)
     {"rows": 4, "hidden": 6, "vocab": 25, "k": 21, "pad": 0, "values": "logprobs", "tail": "renorm",
      "support": "topk", "temperature": 1000.0, "teacher_temperature": 1.5, "scale_by_t2": True, "labels": None,
      "num_items": None, "reduction": "none", "bias": False, "softcap": None, "chunk_size": None,
      "magnitude": 0.3, "quantised": False, "seed": 2734026}),
]
# The fused head at T = 1e-3 with one-row chunks (seed 2718, 1.7x against the unchunked head's error): a
# logit's rounding, amplified by up to 1/T², depends on the GEMM's order, and the kernel's error is exactly
# that of the same eager head computed chunk by chunk (the rule's naive variants).
ROUNDING_ORDER_CASES = [
    ("fused_linear_topk_kl", torch.float32,
     {"rows": 24, "hidden": 41, "vocab": 110, "k": 12, "pad": 0, "values": "logprobs", "tail": "renorm",
      "support": "topk", "temperature": 0.001, "teacher_temperature": 1.0, "scale_by_t2": False, "labels": None,
      "num_items": None, "reduction": "sum", "bias": False, "softcap": None, "chunk_size": 1, "magnitude": 1.0,
      "quantised": False, "seed": 37005491}),
]
# Rule cases: an exact fp16 gradient of ±65514 (< 65520, so it rounds to ±65504) that the kernel, within its
# error, rounds to ±inf; the naive formula overflows too, so error and bound are both inf.
OVERFLOW_EDGE_CASES = [
    ("margin_mse", torch.float16,
     {"kind": "embeddings", "batch": 1, "n_neg": 47, "dim": 39, "teacher": "scores", "reduction": "none",
      "layout": "contiguous", "magnitude": 30.0, "seed": 24494}),
    ("margin_mse", torch.float16,
     {"kind": "embeddings", "batch": 44, "n_neg": 19, "dim": 19, "teacher": "scores", "reduction": "sum",
      "layout": "contiguous", "magnitude": 30.0, "seed": 0}),
    # float16 logits at T = 1e-6 (seed 2718): two logits within a rounding swap places, the id carrying a
    # gradient of ~1e6 moves, and a weight-gradient row whose exact value is 0.002 is 1.4e5 for the rounded
    # logits: inf is the right float16 answer (the rule's rounded_exact)
    ("fused_linear_topk_kl", torch.float16,
     {"rows": 17, "hidden": 5, "vocab": 112, "k": 1, "pad": 0, "values": "logprobs", "tail": "renorm",
      "support": "full", "temperature": 1e-06, "teacher_temperature": 1.0, "scale_by_t2": False, "labels": None,
      "num_items": None, "reduction": "sum", "bias": False, "softcap": None, "chunk_size": None, "magnitude": 0.3,
      "quantised": False, "seed": 1}),
]


@pytest.mark.parametrize("loss, dtype, case", LONG_RUN_CASES, ids=lambda v: str(v).replace("torch.", "")[:20])
def test_cases_found_by_the_long_run(loss, dtype, case):
    result = testing.check_case(loss, case, "cpu", dtype)
    assert result.ok, f"{result}\n" + "\n".join(result.details)
    assert result.ratio < 0.2, result  # with margin: the fixed kernels round only once (0.01-0.03 of the bound)


@pytest.mark.parametrize("loss, dtype, case", ROUNDING_ORDER_CASES, ids=lambda v: str(v).replace("torch.", "")[:20])
def test_rounding_order_of_an_ill_conditioned_head_is_within_the_rule(loss, dtype, case, monkeypatch):
    result = testing.check_case(loss, case, "cpu", dtype)
    assert result.ok, f"{result}\n" + "\n".join(result.details)
    # the unchunked eager head's error alone would not cover it
    monkeypatch.setitem(testing.REGISTRY, loss, dataclasses.replace(testing.get(loss), naive_variants=()))
    assert not testing.check_case(loss, case, "cpu", dtype).ok


@pytest.mark.parametrize("loss, dtype, case", OVERFLOW_EDGE_CASES, ids=lambda v: str(v).replace("torch.", "")[:20])
def test_overflow_at_the_edge_of_the_range_is_within_the_rule(loss, dtype, case):
    result = testing.check_case(loss, case, "cpu", dtype)
    assert result.ok, f"{result}\n" + "\n".join(result.details)


def test_nonfinite_rule_excuses_only_overflow_within_the_slack():
    half = torch.float16
    exact = torch.tensor([65514.0, -65514.0, 60000.0, 65514.0, 65514.0], dtype=torch.float64)
    inf, nan = float("inf"), float("nan")
    for kernel, margin, flagged in [([inf, -inf, 1.0, 1.0, 1.0], 100.0, False),  # within reach of the threshold
                                    ([inf, -inf, 1.0, 1.0, 1.0], 0.0, True),  # no slack: 65514 must stay finite
                                    ([1.0, 1.0, inf, 1.0, 1.0], 100.0, True),  # 60000 + 100 is far from overflow
                                    ([-inf, 1.0, 1.0, 1.0, 1.0], 100.0, True),  # the wrong sign
                                    ([1.0, 1.0, 1.0, nan, 1.0], 100.0, True)]:  # NaN is never excused
        got = testing.nonfinite_where_exact_is_finite(torch.tensor(kernel, dtype=half), exact, margin)
        assert got == flagged, (kernel, margin)


def test_nonfinite_rule_excuses_overflow_of_the_rounded_exact_result_only():
    """An inf of the sign of the exact result for the rounded intermediates (which overflows float16) is
    right; NaN, the other sign, or an entry where that result is finite are not."""
    half = torch.float16
    exact = torch.tensor([0.002, -0.006, 0.003, 0.001], dtype=torch.float64)
    rounded = torch.tensor([1.4e5, -2e5, 1.0, 1e5], dtype=torch.float64)
    inf, nan = float("inf"), float("nan")
    for kernel, flagged in [([inf, -inf, 1.0, 1.0], False), ([1.0, 1.0, inf, 1.0], True),
                            ([-inf, 1.0, 1.0, 1.0], True), ([1.0, 1.0, 1.0, nan], True)]:
        got = testing.nonfinite_where_exact_is_finite(torch.tensor(kernel, dtype=half), exact, 0.0, rounded)
        assert got == flagged, kernel


def test_nonfinite_exact_result_is_matched_not_failed():
    """A stored log-probability of +0.05 (a quantised 0) with tail="none" raised to the power 1/T = 1e6
    overflows: the fp64 reference gives an infinite loss and a NaN gradient (seed 2718, every dtype). The
    kernel giving the same is parity; a finite or differently non-finite kernel result is still an error."""
    case = {"rows": 1, "split": False, "vocab": 1, "k": 1, "pad": 0, "values": "logprobs", "tail": "none",
            "support": "full", "temperature": 1e-06, "teacher_temperature": 1.0, "scale_by_t2": False,
            "labels": None, "num_items": None, "reduction": "sum", "layout": "contiguous", "magnitude": 0.1,
            "confident": False, "student_pad": 0, "quantised": True, "seed": 0, "shifted": False,
            "precompute_grad": None}
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        result = testing.check_case("topk_kl", case, "cpu", dtype)
        assert result.ok, f"{result}\n" + "\n".join(result.details)
    inf, nan = float("inf"), float("nan")
    exact = torch.tensor([inf, nan, 1.0], dtype=torch.float64)
    assert testing.error_where_exact_is_finite(torch.tensor([inf, nan, 1.5]), exact) == 0.5
    assert testing.error_where_exact_is_finite(torch.tensor([-inf, nan, 1.0]), exact) == inf
    assert testing.error_where_exact_is_finite(torch.tensor([inf, 0.0, 1.0]), exact) == inf
