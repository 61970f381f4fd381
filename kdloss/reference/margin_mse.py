"""Margin-MSE reference: ``mean_b,i ((s⁺_b − s⁻_bi) − (t⁺_b − t⁻_bi))²``.

The label-format rule (:func:`kdloss.margin_mse.teacher_is_scores`) is shared pre-processing, imported from
the loss module and tested on its own against sentence-transformers' precedence.
"""

from __future__ import annotations

import torch

from .._validation import accumulation_dtype
from ..margin_mse import MarginMSEOptions, teacher_is_scores
from ._reduce import reduce_terms

__all__ = ["margin_mse_from_embeddings_reference", "margin_mse_reference", "teacher_margins"]


def teacher_margins(teacher: torch.Tensor, batch: int, n_neg: int) -> torch.Tensor:
    """Teacher margins ``t⁺ − t⁻_i`` as ``[B, n]`` from any accepted label format."""
    if teacher_is_scores(teacher, batch, n_neg):
        return teacher[:, :1] - teacher[:, 1:]
    return teacher if teacher.dim() == 2 else teacher.unsqueeze(1)


def margin_mse_reference(
    student_pos: torch.Tensor,
    student_neg: torch.Tensor,
    teacher: torch.Tensor,
    *,
    options: MarginMSEOptions | None = None,
    **option_kwargs,
) -> torch.Tensor:
    """Margin-MSE on scores. ``student_pos [B]``, ``student_neg [B]|[B, n]``, teacher as in
    :func:`teacher_margins`. Returns a scalar, or per-margin squared errors shaped like
    ``student_neg`` for ``reduction="none"``."""
    reduction = (options or MarginMSEOptions(**option_kwargs)).reduction
    acc = accumulation_dtype(student_pos.dtype)
    neg = student_neg if student_neg.dim() == 2 else student_neg.unsqueeze(1)
    margins_t = teacher_margins(teacher.detach().to(acc), neg.shape[0], neg.shape[1])
    error = (student_pos.to(acc).unsqueeze(1) - neg.to(acc)) - margins_t
    return reduce_terms((error * error).reshape(student_neg.shape), reduction, student_pos.dtype)


def margin_mse_from_embeddings_reference(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    teacher: torch.Tensor,
    *,
    options: MarginMSEOptions | None = None,
    **option_kwargs,
) -> torch.Tensor:
    """Margin-MSE with dot-product scores ``s = ⟨q, d⟩`` (sentence-transformers' default
    ``pairwise_dot_score``). ``query, positive [B, D]``, ``negatives [B, D]|[B, n, D]``."""
    reduction = (options or MarginMSEOptions(**option_kwargs)).reduction
    acc = accumulation_dtype(query.dtype)
    q = query.to(acc)
    negs = negatives if negatives.dim() == 3 else negatives.unsqueeze(1)
    s_pos = (q * positive.to(acc)).sum(-1)
    s_neg = (q.unsqueeze(1) * negs.to(acc)).sum(-1)
    margins_t = teacher_margins(teacher.detach().to(acc), s_neg.shape[0], s_neg.shape[1])
    error = (s_pos.unsqueeze(1) - s_neg) - margins_t
    out_shape = negatives.shape[:-1]
    return reduce_terms((error * error).reshape(out_shape), reduction, query.dtype)
