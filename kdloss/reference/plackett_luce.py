"""Plackett-Luce distillation (PLD) reference.

Per row with student logits ``s``, teacher logits ``t`` and label ``y``::

    π*   = (y, then the other classes by descending teacher logit; ties → lower class index first)
    α_k  = softmax(t / τ)[π*_k]
    L    = Σ_k α_k · (log Σ_{l≥k} exp(s_{π*_l}) − s_{π*_k})

Rows whose label is ``ignore_index`` are dropped (0 in ``reduction="none"``, excluded from the mean).
Written with torch ops only (no boolean indexing), so it also traces under ``torch.compile``.
"""

from __future__ import annotations

import torch

from .._autocast import cast_loss
from .._validation import accumulation_dtype
from ..plackett_luce import PlackettLuceOptions

__all__ = ["label_first", "plackett_luce_reference", "teacher_ranking"]


def teacher_ranking(teacher_logits: torch.Tensor) -> torch.Tensor:
    """The teacher's ranking of the classes: ``[..., C]`` int64 indices by descending teacher logit,
    ties broken by lower class index first (a stable descending sort). This is what
    ``teacher_permutation=`` expects when a teacher's orderings are cached."""
    return torch.sort(teacher_logits.detach(), dim=-1, descending=True, stable=True).indices


def label_first(ranking: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """π*: the label moved to the front of each row of ``ranking`` (``[R, C]``), the other classes
    keeping their relative order. ``labels [R]`` must be valid class indices."""
    not_label = (ranking != labels[:, None]).to(torch.int8)  # 0 at the label, 1 elsewhere
    moved = torch.sort(not_label, dim=-1, stable=True).indices
    return ranking.gather(-1, moved)


def plackett_luce_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_permutation: torch.Tensor | None = None,
    num_items_in_batch=None,
    options: PlackettLuceOptions | None = None,
    **option_kwargs,
) -> torch.Tensor:
    """PLD loss. ``student_logits, teacher_logits [..., C]``, ``labels [...]`` (int),
    ``teacher_permutation`` an optional cached :func:`teacher_ranking` ``[..., C]``; options as a
    :class:`~kdloss.plackett_luce.PlackettLuceOptions` or its keywords; ``num_items_in_batch`` replaces
    the mean's count.

    Returns a scalar (``"mean"``/``"sum"``) or ``[...]`` per-row losses (``"none"``), in the student's
    dtype. Computes in fp32 (fp64 for fp64 students); the teacher is a constant.

    Each term ``lse_j − x_j`` is the difference of two numbers as large as the logits, so its
    absolute rounding error grows with the spread of the logits in a row (about eps·spread: the
    fp64 reference is exact to ~1e-10 up to spreads of ~1e6; the kernels compute the difference
    directly and stay accurate for any spread). Finite for any finite logits."""
    options = options or PlackettLuceOptions(**option_kwargs)
    temperature, ignore_index, reduction = options.temperature, options.ignore_index, options.reduction
    acc = accumulation_dtype(student_logits.dtype)
    classes = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    y = labels.reshape(-1).to(torch.int64)
    keep = y != ignore_index
    y_safe = torch.where(keep, y, torch.zeros_like(y))
    # ignored rows may hold anything (NaN included): they are replaced before any arithmetic, so
    # neither their value nor their gradient reaches the result
    s = torch.where(keep[:, None], student_logits.reshape(-1, classes).to(acc), 0.0)
    t = torch.where(keep[:, None], teacher_logits.detach().reshape(-1, classes).to(acc), 0.0)
    if teacher_permutation is None:
        ranking = teacher_ranking(t)
    else:
        ranking = teacher_permutation.reshape(-1, classes).long()
    order = label_first(ranking, y_safe)
    # shifted by the row maximum (a constant: the loss is shift-invariant): logcumsumexp accumulates
    # sequentially, rounding at the scale of its running value at every step, and so does its
    # gradient; unshifted, logits of ~4000 lost 2e-10 of a gradient of 1 over 32000 classes
    # (not where the shift itself would overflow: a row spanning [−2e38, 2e38] is left as it is)
    top = s.detach().amax(dim=-1, keepdim=True)
    detached = s.detach()
    finite_low = detached.masked_fill(~torch.isfinite(detached), float("inf")).amin(dim=-1, keepdim=True)
    shiftable = torch.isfinite(top) & torch.isfinite(finite_low - top)
    s_perm = (s - torch.where(shiftable, top, torch.zeros_like(top))).gather(-1, order)
    log_alpha = torch.log_softmax(t / temperature, dim=-1).gather(-1, order)
    suffix_lse = torch.logcumsumexp(s_perm.flip(-1), dim=-1).flip(-1)
    # lse_j − x_j ≥ 0 exceeds the largest finite value only for logit spreads beyond it: clamped
    # there, and a zero weight contributes exactly 0 (never 0·inf)
    gap = (suffix_lse - s_perm).clamp(max=torch.finfo(acc).max)
    alpha = log_alpha.exp()
    rows = torch.where(alpha > 0, alpha * gap, torch.zeros_like(gap)).sum(-1)
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return cast_loss(rows.reshape(lead), student_logits.dtype)
    total = rows.sum()
    if reduction == "mean":
        count = keep.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=total.device)
        count = count.to(acc)
        total = torch.where(count > 0, total / torch.where(count > 0, count, torch.ones_like(count)),
                            torch.zeros_like(total))
    return cast_loss(total, student_logits.dtype)
