"""Margin-MSE cases for the fuzzer, property tests and benchmarks.

A case: ``kind`` ("scores" | "embeddings"), ``batch`` (0 allowed: empty batch), ``n_neg``, ``dim``,
``teacher`` label format ("scores" [B, n+1] | "margins" [B, n] | "margins_1d" [B], n = 1 only, which
also makes the negatives [B] / [B, D]), ``reduction``, ``layout`` ("contiguous" | "strided": last
dim not unit-stride | "slice": views into one stacked tensor), ``magnitude`` and ``seed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..functional import margin_mse_from_embeddings, margin_mse_loss
from ..reference.margin_mse import margin_mse_from_embeddings_reference, margin_mse_reference
from . import Built, Example, LossSpec, non_contiguous, register

REDUCTIONS = ("mean", "sum", "none")


def strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        kind = draw(st.sampled_from(["scores", "embeddings"]))
        n_neg = draw(st.one_of(st.just(1), st.integers(1, 64)))
        return {
            "kind": kind,
            "batch": draw(st.one_of(st.just(0), st.just(1), st.integers(1, 48))),
            "n_neg": n_neg,
            "dim": draw(st.integers(1, 96)) if kind == "embeddings" else 1,
            "teacher": draw(st.sampled_from(["scores", "margins"] + (["margins_1d"] if n_neg == 1 else []))),
            "reduction": draw(st.sampled_from(REDUCTIONS)),
            "layout": draw(st.sampled_from(["contiguous", "strided", "slice"])),
            "magnitude": draw(st.sampled_from([1e-2, 1.0, 30.0])),
            "seed": draw(st.integers(0, 2**31 - 1)),
        }

    return cases()


def build(case: dict, device: torch.device, dtype: torch.dtype) -> Built:
    """Inputs of one case. "slice" layouts have one leaf (the stacked tensor); see :func:`views`."""
    gen = torch.Generator().manual_seed(case["seed"])
    batch, n_neg, dim, mag = case["batch"], case["n_neg"], case["dim"], case["magnitude"]
    one_d = case["teacher"] == "margins_1d"
    if case["kind"] == "scores":
        columns = mag * torch.randn(batch, n_neg + 1, generator=gen, dtype=torch.float64)
        teacher_scale = mag
    else:
        columns = mag * torch.randn(batch, n_neg + 2, dim, generator=gen, dtype=torch.float64) / dim**0.25
        teacher_scale = mag * mag
    teacher_shape = {"scores": (batch, n_neg + 1), "margins": (batch, n_neg), "margins_1d": (batch,)}
    teacher = teacher_scale * torch.randn(*teacher_shape[case["teacher"]], generator=gen, dtype=torch.float64)
    teacher = teacher.to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    columns = columns.to(device, dtype)
    if case["layout"] == "slice":
        inputs = (columns.requires_grad_(),)
    else:
        if case["kind"] == "scores":
            parts = [columns[:, 0], columns[:, 1:]]
        else:
            parts = [columns[:, 0], columns[:, 1], columns[:, 2:]]
        if one_d:
            parts[-1] = parts[-1][:, 0]
        parts = [non_contiguous(p) if case["layout"] == "strided" else p.contiguous() for p in parts]
        inputs = tuple(p.requires_grad_() for p in parts)
    return Built(inputs, {"teacher": teacher}, upstream_seed=case["seed"] + 1)


def views(case: dict, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The loss arguments of a case: (pos, neg) for scores, (query, positive, negatives) else."""
    if case["layout"] != "slice":
        return inputs
    (columns,) = inputs
    one_d = case["teacher"] == "margins_1d"
    if case["kind"] == "scores":
        return columns[:, 0], (columns[:, 1] if one_d else columns[:, 1:])
    return columns[:, 0], columns[:, 1], (columns[:, 2] if one_d else columns[:, 2:])


def kernel(case, *inputs, teacher):
    args = views(case, *inputs)
    fn = margin_mse_loss if case["kind"] == "scores" else margin_mse_from_embeddings
    return fn(*args, teacher, reduction=case["reduction"], backend="kernel")


def reference(case, *inputs, teacher):
    args = views(case, *inputs)
    fn = margin_mse_reference if case["kind"] == "scores" else margin_mse_from_embeddings_reference
    return fn(*args, teacher, reduction=case["reduction"])


def naive(case, *inputs, teacher):
    """Eager code in the input dtype, as sentence-transformers computes it (MSELoss on margins)."""
    args = views(case, *inputs)
    if case["kind"] == "scores":
        pos, neg = args
    else:
        q, p, negs = args
        pos = (q * p).sum(-1)
        neg = (q.unsqueeze(-2) * negs).sum(-1) if negs.dim() == 3 else (q * negs).sum(-1)
    neg2d = neg if neg.dim() == 2 else neg[:, None]
    t = teacher if teacher.dim() == 2 else teacher[:, None]
    t_margins = t[:, :1] - t[:, 1:] if t.shape[1] == neg2d.shape[1] + 1 else t
    out = F.mse_loss(pos[:, None] - neg2d, t_margins.to(pos.dtype), reduction=case["reduction"])
    if case["reduction"] == "mean" and neg2d.numel() == 0:
        out = (pos[:, None] - neg2d).sum()  # the contract: empty batch → 0 (MSELoss gives NaN)
    return out.reshape(neg.shape) if case["reduction"] == "none" else out


def example(device, dtype) -> Example:
    gen = torch.Generator().manual_seed(0)
    pos, neg, teacher = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((5,), (5, 3), (5, 4)))
    return Example((pos.to(device, dtype), neg.to(device, dtype), teacher.to(device)), {"reduction": "sum"}, (0, 1))


SPEC = register(LossSpec("margin_mse", strategy, build, kernel, reference, naive, example))
