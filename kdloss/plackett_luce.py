"""Plackett-Luce distillation (PLD; spec §2, decision 2): ``plackett_luce_loss`` and ``PlackettLuceLoss``.

One weighted Plackett-Luce likelihood of the teacher-optimal ranking replaces CE + KD::

    π*  = (y, then the other classes by descending teacher logit; ties → lower class index first)
    α_k = softmax(t / τ)[π*_k]
    L   = Σ_k α_k · (log Σ_{l≥k} exp(s_{π*_l}) − s_{π*_k})          (mean over counted rows)

The whole stack: ``kdloss/_ops/plackett_luce.py`` (op schemas, fakes, autograd),
``csrc/cpu/plackett_luce.cpp``, ``csrc/cuda/plackett_luce*.cu|cpp``, ``kdloss/reference/plackett_luce.py``.
"""

from __future__ import annotations

import math
import numbers

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
    check_tensor,
)
from .reference.plackett_luce import plackett_luce_reference, teacher_ranking

__all__ = ["plackett_luce_loss", "plackett_luce_ranking", "PlackettLuceLoss"]

LOSS = "plackett_luce"

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def plackett_luce_ranking(teacher_logits: torch.Tensor) -> torch.Tensor:
    """The teacher's ranking of the classes, to cache and pass as ``teacher_permutation=``.

    Args:
        teacher_logits: ``[..., C]`` float logits.

    Returns:
        ``[..., C]`` int64: class indices by descending teacher logit, ties broken by lower class
        index first (``torch.sort(..., descending=True, stable=True).indices``). It does not depend
        on the labels: the loss moves each row's label to the front itself.
    """
    check_tensor(teacher_logits, "teacher_logits")
    if teacher_logits.dim() < 1:
        raise ValueError(f"teacher_logits must have rank >= 1 ([..., C]), got shape {tuple(teacher_logits.shape)}")
    return teacher_ranking(teacher_logits)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a real number > 0, got {temperature!r}")
    value = float(temperature)
    if not 0.0 < value < math.inf:  # comparisons only: traceable with a symbolic float
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


def _check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    return int(ignore_index)


def _check_label_values(labels: torch.Tensor, classes: int, ignore_index: int) -> None:
    """Labels in [0, C) or equal to ignore_index. A data-dependent check: skipped while
    torch.compile traces (the CPU kernel re-checks every label at run time)."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = ((labels != ignore_index) & ((labels < 0) | (labels >= classes))).any()
    if bool(bad):
        raise ValueError(f"labels must lie in [0, C) with C = {classes} or equal ignore_index = {ignore_index}")


def _check_permutation_values(perm: torch.Tensor, classes: int) -> None:
    """Each row of teacher_permutation holds every class exactly once (skipped while compiling)."""
    if torch.compiler.is_compiling() or perm.numel() == 0:
        return
    flat = perm.reshape(-1, classes)
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


def plackett_luce_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    teacher_permutation: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Plackett-Luce distillation loss (PLD) of the teacher-optimal ranking.

    Args:
        student_logits: ``[..., C]`` student logits (any float dtype); used unscaled.
        teacher_logits: ``[..., C]`` teacher logits (any float dtype), a constant. They give the
            ranking (stable descending sort, ties → lower class index first) and the weights
            ``α = softmax(teacher_logits / temperature)``.
        labels: ``[...]`` integer class indices in ``[0, C)``, or ``ignore_index`` for rows that do
            not count.
        temperature: τ > 0 for the teacher weights only (default 1.0, the paper's value).
        ignore_index: label value of rows to drop (default -100).
        reduction: ``"mean"`` (default, over counted rows; 0 when none counts), ``"sum"`` or
            ``"none"`` (``[...]`` per-row losses, 0 at ignored rows).
        teacher_permutation: optional cached teacher ranking ``[..., C]`` int64, each row a
            permutation of ``0..C-1`` by descending teacher logit — what
            :func:`plackett_luce_ranking` returns — so the sort is skipped. Label-independent: the
            loss still moves each row's label to the front and keeps the others in this order.
            ``teacher_logits`` are still needed for the weights α.
        backend: ``"auto"`` (compiled kernel if available, else the reference with one warning),
            ``"kernel"`` or ``"reference"``.

    Returns:
        The loss in ``student_logits.dtype``: a scalar, or ``labels.shape`` for ``"none"``.
    """
    check_tensor(student_logits, "student_logits")
    check_tensor(teacher_logits, "teacher_logits")
    if student_logits.dim() < 1:
        raise ValueError(f"student_logits must have rank >= 1 ([..., C]), got shape {tuple(student_logits.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES:
        raise ValueError(f"labels must be an integer tensor (class indices), got dtype {labels.dtype}")
    temperature = _check_temperature(temperature)
    ignore_index = _check_ignore_index(ignore_index)
    check_option(reduction, "reduction", REDUCTIONS)
    check_option(backend, "backend", BACKENDS)
    tensors = {"student_logits": student_logits, "teacher_logits": teacher_logits, "labels": labels}
    if teacher_permutation is not None:
        if not isinstance(teacher_permutation, torch.Tensor):
            raise ValueError(f"teacher_permutation must be a torch.Tensor or None, got {type(teacher_permutation).__name__}")
        tensors["teacher_permutation"] = teacher_permutation
    device = check_same_device(**tensors)
    shape = tuple(student_logits.shape)
    classes = shape[-1]
    if tuple(teacher_logits.shape) != shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits {shape}, got {tuple(teacher_logits.shape)}")
    if tuple(labels.shape) != shape[:-1]:
        raise ValueError(
            f"labels must have the leading dims {shape[:-1]} of student_logits [..., C], got shape {tuple(labels.shape)}"
        )
    if classes < 1:
        raise ValueError(f"student_logits must have at least one class (C >= 1), got shape {shape}")
    if teacher_permutation is not None:
        if teacher_permutation.dtype != torch.int64:
            raise ValueError(f"teacher_permutation must be an int64 tensor, got dtype {teacher_permutation.dtype}")
        if tuple(teacher_permutation.shape) != shape:
            raise ValueError(
                f"teacher_permutation must have the shape of student_logits {shape}, got {tuple(teacher_permutation.shape)}"
            )
    _check_label_values(labels, classes, ignore_index)
    kernel = use_kernel(LOSS, device, backend)
    if teacher_permutation is not None and (not kernel or device.type != "cpu"):
        _check_permutation_values(teacher_permutation, classes)  # the CPU kernel checks it itself
    if not kernel:
        return plackett_luce_reference(student_logits, teacher_logits, labels, temperature, ignore_index,
                                       reduction, teacher_permutation)
    rows = math.prod(shape[:-1])
    student = student_logits.reshape(rows, classes)
    teacher = teacher_logits.detach().reshape(rows, classes).to(accumulation_dtype(student_logits.dtype))
    perm = None if teacher_permutation is None else teacher_permutation.reshape(rows, classes)
    out, _order = torch.ops.kdloss.plackett_luce_fwd(
        student, teacher, labels.reshape(rows).long(), perm, temperature, ignore_index,
        _ops.REDUCTION_CODES[reduction],
    )
    return out.reshape(shape[:-1]) if reduction == "none" else out


class PlackettLuceLoss(nn.Module):
    """Module form of :func:`plackett_luce_loss`.

    ``PlackettLuceLoss(temperature=1.0, ignore_index=-100, reduction="mean", backend="auto")``,
    called as ``loss_fn(student_logits [..., C], teacher_logits [..., C], labels [...],
    teacher_permutation=None)``.
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                 backend: str = "auto") -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.ignore_index = _check_ignore_index(ignore_index)
        self.reduction = check_option(reduction, "reduction", REDUCTIONS)
        self.backend = check_option(backend, "backend", BACKENDS)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                teacher_permutation: torch.Tensor | None = None) -> torch.Tensor:
        return plackett_luce_loss(
            student_logits, teacher_logits, labels, temperature=self.temperature, ignore_index=self.ignore_index,
            reduction=self.reduction, teacher_permutation=teacher_permutation, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature!r}, ignore_index={self.ignore_index!r}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
