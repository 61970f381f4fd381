"""PLD cases for the fuzzer, property tests and benchmarks.

A case: ``lead`` (leading dims of the logits: ``[N]`` or ``[B, T]``; 0 rows allowed), ``classes``
(C ≥ 1, including sizes that leave vector tails, cross the radix-sort threshold and reach LLM
vocabularies, where fp32 sums chained over C lose accuracy), ``ties``
(teacher logits rounded to a coarse grid, so many classes tie), ``ignore`` (fraction of rows whose
label is ``ignore_index``), ``permutation`` (pass a cached teacher ranking), ``temperature``,
``reduction``, ``layout`` ("contiguous" | "strided": last dim not unit-stride), ``magnitude`` (up to
1e5: logit spreads where any formula through lse_j itself loses absolute accuracy; larger spreads
exceed what the fp64 reference resolves and are tested against exact values in
tests/test_adversarial.py) and ``seed``. Temperatures include 1e-4 (one-hot teacher weights) and 100.
"""

from __future__ import annotations

import math

import torch

from ..functional import plackett_luce_loss
from ..reference.plackett_luce import label_first, plackett_luce_reference, teacher_ranking
from . import Built, Example, LossSpec, non_contiguous, register

REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -100


def strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        lead = draw(st.sampled_from([(0,), (1,), (5,), (2, 3), (17,), (3, 11)]))
        return {
            "lead": list(lead),
            "classes": draw(st.one_of(st.sampled_from([1, 2, 8, 9, 257, 300, 4099, 32000]), st.integers(1, 80))),
            "ties": draw(st.booleans()),
            "ignore": draw(st.sampled_from([0.0, 0.3, 1.0])),
            "permutation": draw(st.booleans()),
            "temperature": draw(st.one_of(st.sampled_from([1.0, 0.5, 4.0]), st.sampled_from([1e-4, 100.0]))),
            "reduction": draw(st.sampled_from(REDUCTIONS)),
            "layout": draw(st.sampled_from(["contiguous", "strided"])),
            "magnitude": draw(st.one_of(st.sampled_from([1.0, 5.0, 30.0]), st.sampled_from([1e3, 1e5]))),
            "seed": draw(st.integers(0, 2**31 - 1)),
        }

    return cases()


def build(case: dict, device: torch.device, dtype: torch.dtype) -> Built:
    """Student logits are the one differentiable input; teacher logits (in ``dtype``, so every
    backend sees the same ties), labels and the optional ranking are constants."""
    gen = torch.Generator().manual_seed(case["seed"])
    lead, classes = tuple(case["lead"]), case["classes"]
    mag = min(case["magnitude"], 1e-2 * torch.finfo(dtype).max)  # fp16 tops out at 65504
    student = mag * torch.randn(*lead, classes, generator=gen, dtype=torch.float64)
    teacher = mag * torch.randn(*lead, classes, generator=gen, dtype=torch.float64)
    if case["ties"]:
        teacher = teacher.round()
    rows = math.prod(lead)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    drop = torch.rand(rows, generator=gen) < case["ignore"]
    labels = torch.where(drop, torch.full_like(labels, IGNORE_INDEX), labels).reshape(lead)
    student = student.to(device, dtype)
    teacher = teacher.to(device, dtype)
    student = non_contiguous(student) if case["layout"] == "strided" else student.contiguous()
    constants = {"teacher": teacher, "labels": labels.to(device)}
    constants["permutation"] = teacher_ranking(teacher) if case["permutation"] else None
    return Built((student.requires_grad_(),), constants, upstream_seed=case["seed"] + 1)


def kernel(case, student, *, teacher, labels, permutation):
    return plackett_luce_loss(student, teacher, labels, temperature=case["temperature"], ignore_index=IGNORE_INDEX,
                              reduction=case["reduction"], teacher_permutation=permutation, backend="kernel")


def reference(case, student, *, teacher, labels, permutation):
    return plackett_luce_reference(student, teacher, labels, temperature=case["temperature"], ignore_index=IGNORE_INDEX,
                                   reduction=case["reduction"],
                                   teacher_permutation=None if permutation is None else permutation.cpu())


def naive(case, student, *, teacher, labels, permutation):
    """Eager code in the input dtype (the paper's App. C formula with kdloss's tie rule: lower class index first): the
    ranking from the teacher as given, softmax / logcumsumexp / products in the student's dtype."""
    classes = student.shape[-1]
    lead = student.shape[:-1]
    s = student.reshape(-1, classes)
    t = teacher.reshape(-1, classes)
    y = labels.reshape(-1)
    keep = y != IGNORE_INDEX
    y_safe = torch.where(keep, y, torch.zeros_like(y))
    ranking = teacher_ranking(t) if permutation is None else permutation.reshape(-1, classes)
    order = label_first(ranking, y_safe)
    s_perm = s.gather(-1, order)
    alpha = torch.softmax(t.to(s.dtype) / case["temperature"], dim=-1).gather(-1, order)
    lse = torch.logcumsumexp(s_perm.flip(-1), dim=-1).flip(-1)
    rows = (alpha * (lse - s_perm)).sum(-1) * keep.to(s.dtype)
    if case["reduction"] == "none":
        return rows.reshape(lead)
    total = rows.sum()
    return total / keep.sum().clamp(min=1) if case["reduction"] == "mean" else total


def example(device, dtype) -> Example:
    gen = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(2, 3, 7, generator=gen, dtype=torch.float64) for _ in range(2))
    labels = torch.tensor([[1, IGNORE_INDEX, 3], [4, 5, 6]])
    return Example((student.to(device, dtype), teacher.to(device, dtype), labels.to(device)), {"temperature": 1.3})


SPEC = register(LossSpec("plackett_luce", strategy, build, kernel, reference, naive, example))
