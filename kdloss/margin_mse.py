"""Margin-MSE (Hofstätter et al. 2020; spec §4): functional forms and ``MarginMSELoss``.

``L = mean_{b,i} ((s⁺_b − s⁻_{b,i}) − (t⁺_b − t⁻_{b,i}))²`` over the B·n margins — raw scores, signed
margins, no temperature, exactly sentence-transformers' ``MarginMSELoss`` (``nn.MSELoss`` over the
``[B, n]`` margins). The whole stack: ``kdloss/_ops/margin_mse.py`` (op schemas, fakes, autograd),
``csrc/cpu/margin_mse.cpp``, ``csrc/cuda/margin_mse*.cu|cpp``, ``kdloss/reference/margin_mse.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _ops
from ._dispatch import use_kernel
from ._validation import (
    BACKENDS,
    REDUCTIONS,
    accumulation_dtype,
    check_option,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from .reference.margin_mse import (
    margin_mse_from_embeddings_reference,
    margin_mse_reference,
    teacher_is_scores,
)

__all__ = ["margin_mse_loss", "margin_mse_from_embeddings", "MarginMSELoss"]

LOSS = "margin_mse"


def _teacher_for_op(teacher: torch.Tensor, student_dtype: torch.dtype) -> torch.Tensor:
    """The teacher as the ops take it: detached, 2-D, in the accumulation dtype (spec §4.4)."""
    t = teacher.detach().to(accumulation_dtype(student_dtype))
    return t if t.dim() == 2 else t.unsqueeze(1)


def margin_mse_loss(
    student_pos: torch.Tensor,
    student_neg: torch.Tensor,
    teacher: torch.Tensor,
    *,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Margin-MSE between student and teacher score margins.

    Args:
        student_pos: ``[B]`` student scores of (query, positive).
        student_neg: ``[B]`` (one negative) or ``[B, n]`` student scores of (query, negative_i).
        teacher: a constant, in one of three formats, read in this order (sentence-transformers):
            ``[B, n+1]`` raw teacher scores, positive first; ``[B]`` margins ``t⁺ − t⁻`` (n = 1);
            ``[B, n]`` margins ``t⁺ − t⁻_i``. Any float dtype; margins are formed in fp32 (fp64 for
            fp64 students).
        reduction: ``"mean"`` (default, over all B·n margins), ``"sum"`` or ``"none"`` (squared
            errors shaped like ``student_neg``).
        backend: ``"auto"`` (compiled kernel if available, else the reference with one warning),
            ``"kernel"`` or ``"reference"``.

    Returns:
        The loss in ``student_pos.dtype`` (a scalar unless ``reduction="none"``). Empty batches give 0.
    """
    check_tensor(student_pos, "student_pos", ndim=1)
    check_tensor(student_neg, "student_neg", ndim=(1, 2))
    check_tensor(teacher, "teacher", ndim=(1, 2))
    check_option(reduction, "reduction", REDUCTIONS)
    device = check_same_device(student_pos=student_pos, student_neg=student_neg, teacher=teacher)
    check_same_dtype(student_pos=student_pos, student_neg=student_neg)
    batch = student_pos.shape[0]
    if student_neg.shape[0] != batch:
        raise ValueError(
            f"student_neg must be [B] or [B, n] with B = {batch} (from student_pos), "
            f"got shape {tuple(student_neg.shape)}"
        )
    neg = student_neg if student_neg.dim() == 2 else student_neg.unsqueeze(1)
    if neg.shape[1] == 0:
        raise ValueError("student_neg must hold at least one negative per query, got n = 0")
    is_scores = teacher_is_scores(teacher, batch, neg.shape[1])  # validates; names the argument
    if not use_kernel(LOSS, device, backend):
        return margin_mse_reference(student_pos, student_neg, teacher, reduction)
    out = torch.ops.kdloss.margin_mse_fwd(
        student_pos, neg, _teacher_for_op(teacher, student_pos.dtype), is_scores,
        _ops.REDUCTION_CODES[reduction],
    )
    return out.reshape(student_neg.shape) if reduction == "none" else out


def margin_mse_from_embeddings(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    teacher: torch.Tensor,
    *,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Margin-MSE with dot-product scores computed inside the kernel (sentence-transformers'
    bi-encoder default ``pairwise_dot_score``): ``s⁺ = ⟨q, p⟩``, ``s⁻_i = ⟨q, n_i⟩``.

    Args:
        query: ``[B, D]`` query embeddings.
        positive: ``[B, D]`` positive-document embeddings.
        negatives: ``[B, D]`` (one negative) or ``[B, n, D]`` negative-document embeddings; any
            strides (the last dimension is copied only if it is not unit-stride).
        teacher, reduction, backend: as in :func:`margin_mse_loss`.

    Returns:
        The loss in ``query.dtype``; ``reduction="none"`` gives ``negatives.shape[:-1]``.
        Gradients flow to query, positive and negatives (fused backward).
    """
    check_tensor(query, "query", ndim=2)
    check_tensor(positive, "positive", ndim=2)
    check_tensor(negatives, "negatives", ndim=(2, 3))
    check_tensor(teacher, "teacher", ndim=(1, 2))
    check_option(reduction, "reduction", REDUCTIONS)
    device = check_same_device(query=query, positive=positive, negatives=negatives, teacher=teacher)
    check_same_dtype(query=query, positive=positive, negatives=negatives)
    if positive.shape != query.shape:
        raise ValueError(
            f"positive must have the shape of query {tuple(query.shape)}, got {tuple(positive.shape)}"
        )
    negs = negatives if negatives.dim() == 3 else negatives.unsqueeze(1)
    batch, dim = query.shape
    if negs.shape[0] != batch or negs.shape[2] != dim:
        raise ValueError(
            f"negatives must be [B, D] or [B, n, D] with B = {batch}, D = {dim} (from query), "
            f"got shape {tuple(negatives.shape)}"
        )
    if negs.shape[1] == 0:
        raise ValueError("negatives must hold at least one negative per query, got n = 0")
    is_scores = teacher_is_scores(teacher, batch, negs.shape[1])  # validates; names the argument
    if not use_kernel(LOSS, device, backend):
        return margin_mse_from_embeddings_reference(query, positive, negatives, teacher, reduction)
    out = torch.ops.kdloss.margin_mse_emb_fwd(
        query, positive, negs, _teacher_for_op(teacher, query.dtype), is_scores,
        _ops.REDUCTION_CODES[reduction],
    )
    return out.reshape(negatives.shape[:-1]) if reduction == "none" else out


class MarginMSELoss(nn.Module):
    """Module form of :func:`margin_mse_loss`.

    ``MarginMSELoss(reduction="mean", backend="auto")(student_pos, student_neg, teacher)``;
    :meth:`from_embeddings` calls :func:`margin_mse_from_embeddings` with the same options.
    """

    def __init__(self, *, reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        self.reduction = check_option(reduction, "reduction", REDUCTIONS)
        self.backend = check_option(backend, "backend", BACKENDS)

    def forward(
        self, student_pos: torch.Tensor, student_neg: torch.Tensor, teacher: torch.Tensor
    ) -> torch.Tensor:
        return margin_mse_loss(
            student_pos, student_neg, teacher, reduction=self.reduction, backend=self.backend
        )

    def from_embeddings(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor,
        teacher: torch.Tensor,
    ) -> torch.Tensor:
        """Dot-product scores inside the kernel; see :func:`margin_mse_from_embeddings`."""
        return margin_mse_from_embeddings(
            query, positive, negatives, teacher, reduction=self.reduction, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"
