"""TRG contrastive-loss (global InfoNCE) cases for the fuzzer, property tests and benchmarks.

A case: ``nodes`` M (0 allowed), width ``dim`` E, ``temperature``, ``similarity`` ("cosine" | "dot"),
``symmetric``, ``detach_teacher``, ``reduction``, ``layout`` ("contiguous" | "strided": both inputs'
last dim not unit-stride), ``magnitude`` of the nodes and ``seed``. Both the student and the teacher
nodes are differentiable leaves (the teacher's gradient is zero when ``detach_teacher``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..functional import token_contrastive_loss
from ..reference.token_contrastive import token_contrastive_reference
from . import Built, Example, LossSpec, non_contiguous, register

REDUCTIONS = ("mean", "sum", "none")


def strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        return {
            "nodes": draw(st.one_of(st.just(0), st.just(1), st.just(2), st.integers(1, 70), st.just(300))),
            "dim": draw(st.one_of(st.just(1), st.integers(1, 48))),
            "temperature": draw(st.sampled_from([0.05, 0.1, 0.5, 2.0])),
            "similarity": draw(st.sampled_from(["cosine", "dot"])),
            "symmetric": draw(st.booleans()),
            "detach_teacher": draw(st.booleans()),
            "reduction": draw(st.sampled_from(REDUCTIONS)),
            "layout": draw(st.sampled_from(["contiguous", "strided"])),
            "magnitude": draw(st.sampled_from([0.1, 1.0, 3.0])),
            "seed": draw(st.integers(0, 2**31 - 1)),
        }

    return cases()


def build(case: dict, device: torch.device, dtype: torch.dtype) -> Built:
    """Student and teacher nodes ``[M, E]``, both leaves."""
    gen = torch.Generator().manual_seed(case["seed"])
    m, e, mag = case["nodes"], case["dim"], case["magnitude"]
    student = (mag * torch.randn(m, e, generator=gen, dtype=torch.float64)).to(device, dtype)
    teacher = (mag * torch.randn(m, e, generator=gen, dtype=torch.float64)).to(device, dtype)
    if case["layout"] == "strided":
        student, teacher = non_contiguous(student), non_contiguous(teacher)
    return Built((student.requires_grad_(), teacher.requires_grad_()), {}, upstream_seed=case["seed"] + 1)


def _options(case):
    return {"temperature": case["temperature"], "similarity": case["similarity"], "symmetric": case["symmetric"],
            "detach_teacher": case["detach_teacher"], "reduction": case["reduction"]}


def kernel(case, student, teacher):
    return token_contrastive_loss(student, teacher, backend="kernel", **_options(case))


def reference(case, student, teacher):
    return token_contrastive_reference(student, teacher, **_options(case))


def naive(case, student, teacher):
    """Eager code in the input dtype: normalise, one similarity GEMM, cross-entropy on the diagonal."""
    m = student.shape[0]
    if case["detach_teacher"]:
        teacher = teacher.detach()
    if m == 0:
        per_row = student.sum(-1) * 0
    else:
        hs, ht = student, teacher
        if case["similarity"] == "cosine":
            hs, ht = F.normalize(hs, dim=-1), F.normalize(ht, dim=-1)
        logits = hs @ ht.T / case["temperature"]
        target = torch.arange(m, device=student.device)
        per_row = F.cross_entropy(logits, target, reduction="none")
        if case["symmetric"]:
            per_row = 0.5 * (per_row + F.cross_entropy(logits.T, target, reduction="none"))
    reduction = case["reduction"]
    if reduction == "none":
        return per_row
    return per_row.mean() if reduction == "mean" and per_row.numel() else per_row.sum()


def example(device, dtype) -> Example:
    gen = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(9, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    return Example((student.to(device, dtype), teacher.to(device, dtype)), {"temperature": 0.5, "symmetric": True},
                   differentiable=(0, 1))


SPEC = register(LossSpec("token_contrastive", strategy, build, kernel, reference, naive, example))
