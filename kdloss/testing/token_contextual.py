"""TRG contextual-loss cases for the fuzzer, property tests and benchmarks.

A case: ``batch`` B (0 allowed), ``tokens`` N (0 allowed), widths ``ds`` and ``dt`` (may differ),
``reduction``, ``layout`` ("contiguous" | "strided": student's last dim not unit-stride | "slice":
the student is a token-range view of a longer tensor), ``magnitude`` of the features and ``seed``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..functional import token_contextual_loss
from ..reference.token_contextual import token_contextual_reference
from . import Built, Example, LossSpec, non_contiguous, register

REDUCTIONS = ("mean", "sum", "none")


def strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        return {
            "batch": draw(st.one_of(st.just(0), st.just(1), st.integers(1, 4))),
            "tokens": draw(st.one_of(st.just(0), st.just(1), st.integers(1, 40))),
            "ds": draw(st.one_of(st.just(1), st.integers(1, 48))),
            "dt": draw(st.one_of(st.just(1), st.integers(1, 48))),
            "reduction": draw(st.sampled_from(REDUCTIONS)),
            "layout": draw(st.sampled_from(["contiguous", "strided", "slice"])),
            "magnitude": draw(st.sampled_from([0.1, 1.0, 3.0])),
            "seed": draw(st.integers(0, 2**31 - 1)),
        }

    return cases()


def build(case: dict, device: torch.device, dtype: torch.dtype) -> Built:
    """Student tokens (the leaf) and teacher tokens (a constant, in the student's dtype)."""
    gen = torch.Generator().manual_seed(case["seed"])
    b, n, mag = case["batch"], case["tokens"], case["magnitude"]
    student = mag * torch.randn(b, n, case["ds"], generator=gen, dtype=torch.float64)
    teacher = mag * torch.randn(b, n, case["dt"], generator=gen, dtype=torch.float64)
    student, teacher = student.to(device, dtype), teacher.to(device, dtype)
    if case["layout"] == "strided":
        student = non_contiguous(student)
    elif case["layout"] == "slice":
        student = torch.cat([student, student[:, :1]], dim=1)  # the case uses [:, :N]
    return Built((student.requires_grad_(),), {"teacher": teacher}, upstream_seed=case["seed"] + 1)


def _student(case, inputs):
    (student,) = inputs
    return student[:, : case["tokens"]] if case["layout"] == "slice" else student


def kernel(case, *inputs, teacher):
    return token_contextual_loss(_student(case, inputs), teacher, reduction=case["reduction"], backend="kernel")


def reference(case, *inputs, teacher):
    return token_contextual_reference(_student(case, inputs), teacher, reduction=case["reduction"])


def naive(case, *inputs, teacher):
    """Eager code in the input dtype: two batched GEMMs, two softmaxes and ``F.mse_loss``."""
    s = _student(case, inputs)

    def context(x):
        return torch.softmax(x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1]), dim=-1)

    cs, ct = context(s), context(teacher.to(s.dtype))
    if case["reduction"] == "none":
        squared = F.mse_loss(cs, ct, reduction="none")
        return squared.mean(-1) if s.shape[1] else squared.sum(-1)
    if cs.numel() == 0:
        return cs.sum()  # the contract: empty → 0 (MSELoss gives NaN)
    return F.mse_loss(cs, ct, reduction=case["reduction"])


def example(device, dtype) -> Example:
    gen = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(2, 5, d, generator=gen, dtype=torch.float64) for d in (4, 6))
    return Example((student.to(device, dtype), teacher.to(device, dtype)), {"reduction": "sum"})


SPEC = register(LossSpec("token_contextual", strategy, build, kernel, reference, naive, example))
