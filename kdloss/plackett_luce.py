"""Plackett-Luce distillation (PLD): :func:`plackett_luce_loss`, :func:`plackett_luce_ranking` and
:class:`PlackettLuceLoss`.

One weighted Plackett-Luce likelihood of the teacher-optimal ranking replaces CE + KD::

    π*  = (y, then the other classes by descending teacher logit; ties → lower class index first)
    α_k = softmax(t / τ)[π*_k]
    L   = Σ_k α_k · (log Σ_{l≥k} exp(s_{π*_l}) − s_{π*_k})          (mean over counted rows)

Without labels, ``y`` is the teacher's own top class, so ``π*`` is the teacher's ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _ops
from ._autocast import cast_loss
from ._dispatch import use_kernel
from ._options import OptionsModule
from ._validation import (
    REDUCTIONS,
    accumulation_dtype,
    check_index_tensor,
    check_int,
    check_label_values,
    check_labels,
    check_num_items,
    check_option,
    check_same_device,
    check_scale,
    check_tensor,
    comparable,
    has_data,
    mean_divisor,
)

__all__ = ["PlackettLuceLoss", "PlackettLuceOptions", "plackett_luce_loss", "plackett_luce_ranking"]


@dataclass(frozen=True)
class PlackettLuceOptions:
    """Options of :func:`plackett_luce_loss`.

    Args:
        temperature: τ > 0 of the teacher weights ``α = softmax(t / τ)`` only (default 1.0, the paper's value).
        ignore_index: label value of rows that do not count (default -100).
        reduction: ``"mean"`` (default, over counted rows; 0 when none counts), ``"sum"`` or ``"none"``.
    """

    temperature: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"

    def __post_init__(self) -> None:
        check_scale(self.temperature, "temperature")
        check_int(self.ignore_index, "ignore_index")
        check_option(self.reduction, "reduction", REDUCTIONS)


def plackett_luce_ranking(teacher_logits: torch.Tensor) -> torch.Tensor:
    """The teacher's ranking of the classes, to cache and pass as ``teacher_permutation=``.

    Args:
        teacher_logits: ``[..., C]`` float logits.

    Returns:
        ``[..., C]`` int64: class indices by descending teacher logit, ties broken by lower class index
        first (a stable descending sort). It does not depend on the labels: the loss moves each row's
        label to the front itself.

    Example:
        >>> plackett_luce_ranking(torch.tensor([[0.5, 2.0, 0.5]]))
        tensor([[1, 0, 2]])
    """
    check_tensor(teacher_logits, "teacher_logits")
    if teacher_logits.dim() < 1:
        raise ValueError(f"teacher_logits must have rank >= 1 ([..., C]), got shape {tuple(teacher_logits.shape)}")
    return torch.sort(teacher_logits.detach(), dim=-1, descending=True, stable=True).indices


def _check_permutation_values(perm: torch.Tensor, classes: int) -> None:
    """Each row of teacher_permutation holds every class exactly once (one host sync; skipped while
    compiling — the CPU kernel re-checks it)."""
    if not has_data(perm) or perm.numel() == 0:
        return
    flat = comparable(perm).reshape(-1, classes).long()
    in_range = bool(((flat >= 0) & (flat < classes)).all())
    if in_range:
        seen = torch.zeros(flat.shape, dtype=torch.int32, device=flat.device)
        seen.scatter_(1, flat, 1)
        in_range = bool(seen.all())
    if not in_range:
        raise ValueError(
            f"teacher_permutation must hold each class index in [0, {classes}) exactly once per row "
            "(e.g. plackett_luce_ranking(teacher_logits))"
        )


def _check_inputs(student_logits, teacher_logits, labels, teacher_permutation) -> torch.device:
    check_tensor(student_logits, "student_logits")
    check_tensor(teacher_logits, "teacher_logits")
    shape = tuple(student_logits.shape)
    if student_logits.dim() < 1 or shape[-1] < 1:
        raise ValueError(f"student_logits must be [..., C] with C >= 1, got shape {shape}")
    if tuple(teacher_logits.shape) != shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits {shape}, "
                         f"got {tuple(teacher_logits.shape)}")
    check_labels(labels, shape[:-1], "student_logits [..., C]")
    tensors = {"student_logits": student_logits, "teacher_logits": teacher_logits}
    if labels is not None:
        tensors["labels"] = labels
    if teacher_permutation is not None:
        check_index_tensor(teacher_permutation, "teacher_permutation")
        if tuple(teacher_permutation.shape) != shape:
            raise ValueError(f"teacher_permutation must have the shape of student_logits {shape}, "
                             f"got {tuple(teacher_permutation.shape)}")
        tensors["teacher_permutation"] = teacher_permutation
    return check_same_device(**tensors)


def _teacher_top_class(teacher_logits, teacher_permutation) -> torch.Tensor:
    """Labels ``[...]`` when none are given: the teacher's first-ranked class (lowest index among ties)."""
    if teacher_permutation is not None:
        return teacher_permutation[..., 0].long()
    return teacher_logits.detach().argmax(dim=-1)


_D = PlackettLuceOptions


def plackett_luce_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = _D.temperature,
    teacher_permutation: torch.Tensor | None = None,
    ignore_index: int = _D.ignore_index,
    reduction: str = _D.reduction,
    num_items_in_batch: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Plackett-Luce distillation loss (PLD) of the teacher-optimal ranking.

    Args:
        student_logits: ``[..., C]`` student logits (any float dtype); used unscaled.
        teacher_logits: ``[..., C]`` teacher logits (any float dtype), a constant. They give the ranking
            (stable descending sort, ties → lower class index first) and the weights
            ``α = softmax(teacher_logits / temperature)``.
        labels: optional ``[...]`` integer class indices in ``[0, C)``, or ``ignore_index`` for rows that do
            not count. None: every row counts and its label is the teacher's top class (π* is then the
            teacher's ranking).
        temperature: τ > 0 for the teacher weights only (default 1.0, the paper's value).
        teacher_permutation: optional cached teacher ranking ``[..., C]`` (integer), each row a permutation
            of ``0..C-1`` by descending teacher logit — what :func:`plackett_luce_ranking` returns — so the
            sort is skipped. Label-independent: the loss still moves each row's label to the front.
            ``teacher_logits`` are still needed for the weights α.
        ignore_index: label value of rows to drop (default -100).
        reduction: ``"mean"`` (default, over counted rows; 0 when none counts), ``"sum"`` or ``"none"``
            (``[...]`` per-row losses, 0 at ignored rows).
        num_items_in_batch: with ``"mean"``, divide the sum by this count instead (an int or a one-element
            tensor; e.g. :func:`kdloss.distributed.num_items_for_ddp`). A count ≤ 0 gives 0.
        backend: ``"auto"`` (compiled kernel if available, else the reference with one warning),
            ``"kernel"`` or ``"reference"``.

    Shape:
        ``student_logits [..., C]``, ``teacher_logits [..., C]``, ``labels [...]``.

    Returns:
        The loss in ``student_logits.dtype`` (fp32 under autocast): a scalar, or ``[...]`` for ``"none"``.

    Example:
        >>> student = torch.randn(8, 10, requires_grad=True)
        >>> plackett_luce_loss(student, torch.randn(8, 10), torch.randint(0, 10, (8,))).backward()

    References:
        PLD: "Plackett-Luce distillation" — a weighted Plackett-Luce likelihood of the teacher-optimal
        ranking replacing cross-entropy + KD.
    """
    options = PlackettLuceOptions(temperature=temperature, ignore_index=ignore_index, reduction=reduction)
    device = _check_inputs(student_logits, teacher_logits, labels, teacher_permutation)
    num_items = check_num_items(num_items_in_batch, reduction, device)
    shape = tuple(student_logits.shape)
    classes = shape[-1]
    check_label_values(labels, classes, options.ignore_index)
    if teacher_permutation is not None:
        _check_permutation_values(teacher_permutation, classes)
    if labels is None:
        labels = _teacher_top_class(teacher_logits, teacher_permutation)
    if not use_kernel("plackett_luce", device, backend):
        from .reference.plackett_luce import plackett_luce_reference

        return plackett_luce_reference(student_logits, teacher_logits, labels, options=options,
                                       teacher_permutation=teacher_permutation, num_items_in_batch=num_items)
    rows = math.prod(shape[:-1])
    acc = accumulation_dtype(student_logits.dtype)
    student = student_logits.reshape(rows, classes)
    teacher = teacher_logits.detach().reshape(rows, classes).to(acc)
    perm = None if teacher_permutation is None else teacher_permutation.reshape(rows, classes).long()
    flat_labels = comparable(labels).reshape(rows).long()
    op_reduction = "sum" if num_items is not None else reduction
    out, _order = torch.ops.kdloss.plackett_luce_fwd(
        student, teacher, flat_labels, perm, _ops.float_arg(temperature), options.ignore_index,
        _ops.REDUCTION_CODES[op_reduction],
    )
    if num_items is not None:
        divisor = mean_divisor(flat_labels != options.ignore_index, num_items, acc)
        out = out / torch.where(divisor > 0, divisor, torch.ones_like(divisor)) * (divisor > 0)
    return cast_loss(out.reshape(shape[:-1]) if reduction == "none" else out, student_logits.dtype)


class PlackettLuceLoss(OptionsModule):
    """Module form of :func:`plackett_luce_loss`.

    Args:
        temperature, ignore_index, reduction, backend: as in :func:`plackett_luce_loss`.

    Shape:
        ``forward(student_logits [..., C], teacher_logits [..., C], labels [...] = None, *,
        teacher_permutation=None, num_items_in_batch=None)``.

    Example:
        >>> loss_fn = PlackettLuceLoss(temperature=1.0)
        >>> loss_fn(torch.randn(8, 10, requires_grad=True), torch.randn(8, 10), torch.randint(0, 10, (8,))).backward()
    """

    def __init__(self, *, temperature: float = _D.temperature, ignore_index: int = _D.ignore_index,
                 reduction: str = _D.reduction, backend: str = "auto") -> None:
        super().__init__(PlackettLuceOptions(temperature=temperature, ignore_index=ignore_index, reduction=reduction),
                         backend)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        teacher_permutation: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See :func:`plackett_luce_loss`."""
        return plackett_luce_loss(student_logits, teacher_logits, labels, teacher_permutation=teacher_permutation,
                                  num_items_in_batch=num_items_in_batch, backend=self.backend,
                                  **self.option_kwargs())
