"""TRG graph-loss (kNN local structure) cases for the fuzzer, property tests and benchmarks.

A case: ``nodes`` M (0 allowed), widths ``ds`` and ``dt`` (may differ), ``k`` edges per node (0
allowed), ``graph`` — how the neighbours are chosen: ``"teacher"`` / ``"student"`` (kNN of that
side, k clipped to M − 1) or ``"random"`` (uniform indices, self-edges and repeats included) —
``sigma``, ``edge``, ``kl_direction``, ``reduction``, ``layout`` ("contiguous" | "strided": the
student's last dim not unit-stride), ``magnitude`` of the features and ``seed``. The neighbours are
built once from the fp64 features and passed to the kernel, the reference and the naive formula
alike, so all three see the same graph in every dtype.
"""

from __future__ import annotations

import torch

from ..functional import token_graph_loss
from ..reference.token_graph import edge_logits, token_graph_reference
from ..token_graph import knn_indices
from . import Built, Example, LossSpec, non_contiguous, register

REDUCTIONS = ("mean", "sum", "none")


def strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        return {
            "nodes": draw(st.one_of(st.just(0), st.just(1), st.just(2), st.integers(1, 60))),
            "ds": draw(st.one_of(st.just(1), st.integers(1, 48))),
            "dt": draw(st.one_of(st.just(1), st.integers(1, 48))),
            "k": draw(st.one_of(st.just(0), st.just(1), st.integers(1, 12))),
            "graph": draw(st.sampled_from(["teacher", "student", "random"])),
            "sigma": draw(st.sampled_from([0.5, 2.0, 8.0, 32.0])),
            "edge": draw(st.sampled_from(["kernel", "log_kernel"])),
            "kl_direction": draw(st.sampled_from(["student_teacher", "teacher_student"])),
            "reduction": draw(st.sampled_from(REDUCTIONS)),
            "layout": draw(st.sampled_from(["contiguous", "strided"])),
            "magnitude": draw(st.sampled_from([0.1, 1.0, 3.0])),
            "seed": draw(st.integers(0, 2**31 - 1)),
        }

    return cases()


def neighbours_of(case: dict, student: torch.Tensor, teacher: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The case's edge list ``[M, k']`` (int64, CPU) from fp64 features."""
    m, k = case["nodes"], case["k"]
    if case["graph"] == "random":
        if m == 0:
            return torch.empty(0, k, dtype=torch.long)
        return torch.randint(0, m, (m, k), generator=gen)
    return knn_indices(teacher if case["graph"] == "teacher" else student, min(k, max(m - 1, 0)))


def build(case: dict, device: torch.device, dtype: torch.dtype) -> Built:
    """Student nodes (the leaf), teacher nodes (a constant, in the student's dtype), neighbours."""
    gen = torch.Generator().manual_seed(case["seed"])
    m, mag = case["nodes"], case["magnitude"]
    student = mag * torch.randn(m, case["ds"], generator=gen, dtype=torch.float64)
    teacher = mag * torch.randn(m, case["dt"], generator=gen, dtype=torch.float64)
    neighbours = neighbours_of(case, student, teacher, gen).to(device)
    student, teacher = student.to(device, dtype), teacher.to(device, dtype)
    if case["layout"] == "strided":
        student = non_contiguous(student)
    return Built((student.requires_grad_(),), {"teacher": teacher, "neighbours": neighbours},
                 upstream_seed=case["seed"] + 1)


def _options(case):
    return {"sigma": case["sigma"], "edge": case["edge"], "kl_direction": case["kl_direction"],
            "reduction": case["reduction"]}


def kernel(case, student, *, teacher, neighbours):
    return token_graph_loss(student, teacher, neighbours=neighbours, backend="kernel", **_options(case))


def reference(case, student, *, teacher, neighbours):
    return token_graph_reference(student, teacher, neighbours=neighbours, **_options(case))


def naive(case, student, *, teacher, neighbours):
    """Eager code in the input dtype: gathered differences, kernel values, two log-softmaxes, KL."""
    reduction = case["reduction"]
    if student.shape[0] == 0 or neighbours.shape[1] == 0:
        per_row = student.sum(-1) * 0
    else:
        log_ps = torch.log_softmax(edge_logits(student, neighbours, case["sigma"], case["edge"]), dim=-1)
        log_pt = torch.log_softmax(edge_logits(teacher.to(student.dtype), neighbours, case["sigma"], case["edge"]),
                                   dim=-1)
        if case["kl_direction"] == "student_teacher":
            per_row = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
        else:
            per_row = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if reduction == "none":
        return per_row
    return per_row.mean() if reduction == "mean" and per_row.numel() else per_row.sum()


def example(device, dtype) -> Example:
    gen = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(9, d, generator=gen, dtype=torch.float64) for d in (4, 3))
    return Example((student.to(device, dtype), teacher.to(device, dtype)), {"k": 3, "sigma": 4.0})


SPEC = register(LossSpec("token_graph", strategy, build, kernel, reference, naive, example))
