"""Margin-MSE (Hofstätter et al. 2020): :func:`margin_mse_loss`, :func:`margin_mse_from_embeddings` and
:class:`MarginMSELoss`.

``L = mean_{b,i} ((s⁺_b − s⁻_{b,i}) − (t⁺_b − t⁻_{b,i}))²`` over the B·n margins — raw scores, signed
margins, no temperature, exactly sentence-transformers' ``MarginMSELoss`` (``nn.MSELoss`` over the
``[B, n]`` margins).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops
from ._autocast import cast_loss
from ._dispatch import use_kernel
from ._options import OptionsModule
from ._validation import (
    REDUCTIONS,
    accumulation_dtype,
    check_option,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

__all__ = ["MarginMSELoss", "MarginMSEOptions", "margin_mse_from_embeddings", "margin_mse_loss", "teacher_is_scores"]


@dataclass(frozen=True)
class MarginMSEOptions:
    """Options of :func:`margin_mse_loss` and :func:`margin_mse_from_embeddings`.

    Args:
        reduction: ``"mean"`` (default, over all B·n margins), ``"sum"`` or ``"none"``.
    """

    reduction: str = "mean"

    def __post_init__(self) -> None:
        check_option(self.reduction, "reduction", REDUCTIONS)


def teacher_is_scores(teacher: torch.Tensor, batch: int, n_neg: int) -> bool:
    """Reads the teacher label format from its shape, in sentence-transformers' order.

    True for ``[B, n+1]`` raw scores (positive first); False for ``[B]`` margins (n = 1 only) or
    ``[B, n]`` margins. Anything else → ``ValueError`` naming ``teacher``. For n = 1, ``[B, 2]`` is always
    raw scores and ``[B, 1]`` margins.
    """
    shape = tuple(teacher.shape)
    if shape == (batch, n_neg + 1):
        return True
    if shape == (batch, n_neg) or (shape == (batch,) and n_neg == 1):
        return False
    raise ValueError(
        f"teacher must be [B, n+1] raw scores = {[batch, n_neg + 1]}, [B, n] margins = "
        f"{[batch, n_neg]}" + (f" or [B] margins = {[batch]}" if n_neg == 1 else "")
        + f", got shape {list(shape)}"
    )


def _teacher_for_op(teacher: torch.Tensor, student_dtype: torch.dtype) -> torch.Tensor:
    """The teacher as the ops take it: detached, 2-D, in the accumulation dtype."""
    t = teacher.detach().to(accumulation_dtype(student_dtype))
    return t if t.dim() == 2 else t.unsqueeze(1)


def margin_mse_loss(
    student_pos: torch.Tensor,
    student_neg: torch.Tensor,
    teacher: torch.Tensor,
    *,
    reduction: str = MarginMSEOptions.reduction,
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

    Shape:
        ``student_pos [B]``, ``student_neg [B]`` or ``[B, n]``, ``teacher [B, n+1]``, ``[B]`` or ``[B, n]``.

    Returns:
        The loss in ``student_pos.dtype`` (fp32 under autocast; a scalar unless ``reduction="none"``).
        Empty batches give 0.

    Example:
        >>> pos, neg = torch.randn(8, requires_grad=True), torch.randn(8, 3, requires_grad=True)
        >>> margin_mse_loss(pos, neg, torch.randn(8, 4)).backward()

    References:
        Hofstätter et al., "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
        Distillation" (2020); sentence-transformers' ``MarginMSELoss``.
    """
    options = MarginMSEOptions(reduction=reduction)
    check_tensor(student_pos, "student_pos", ndim=1)
    check_tensor(student_neg, "student_neg", ndim=(1, 2))
    check_tensor(teacher, "teacher", ndim=(1, 2))
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
    if not use_kernel("margin_mse", device, backend):
        from .reference.margin_mse import margin_mse_reference

        return margin_mse_reference(student_pos, student_neg, teacher, options=options)
    out = torch.ops.kdloss.margin_mse_fwd(
        student_pos, neg, _teacher_for_op(teacher, student_pos.dtype), is_scores,
        _ops.REDUCTION_CODES[reduction],
    )
    return cast_loss(out.reshape(student_neg.shape) if reduction == "none" else out, student_pos.dtype)


def margin_mse_from_embeddings(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    teacher: torch.Tensor,
    *,
    reduction: str = MarginMSEOptions.reduction,
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

    Shape:
        ``query [B, D]``, ``positive [B, D]``, ``negatives [B, D]`` or ``[B, n, D]``, teacher as in
        :func:`margin_mse_loss`.

    Returns:
        The loss in ``query.dtype`` (fp32 under autocast); ``reduction="none"`` gives
        ``negatives.shape[:-1]``.
        Gradients flow to query, positive and negatives (fused backward).

    Example:
        >>> q, p = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
        >>> negs = torch.randn(8, 3, 16, requires_grad=True)
        >>> margin_mse_from_embeddings(q, p, negs, torch.randn(8, 4)).backward()
    """
    options = MarginMSEOptions(reduction=reduction)
    check_tensor(query, "query", ndim=2)
    check_tensor(positive, "positive", ndim=2)
    check_tensor(negatives, "negatives", ndim=(2, 3))
    check_tensor(teacher, "teacher", ndim=(1, 2))
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
    if not use_kernel("margin_mse", device, backend):
        from .reference.margin_mse import margin_mse_from_embeddings_reference

        return margin_mse_from_embeddings_reference(query, positive, negatives, teacher, options=options)
    out = torch.ops.kdloss.margin_mse_emb_fwd(
        query, positive, negs, _teacher_for_op(teacher, query.dtype), is_scores,
        _ops.REDUCTION_CODES[reduction],
    )
    return cast_loss(out.reshape(negatives.shape[:-1]) if reduction == "none" else out, query.dtype)


class MarginMSELoss(OptionsModule):
    """Module form of :func:`margin_mse_loss`; :meth:`from_embeddings` calls
    :func:`margin_mse_from_embeddings` with the same options.

    Args:
        reduction, backend: as in :func:`margin_mse_loss`.

    Shape:
        ``forward(student_pos [B], student_neg [B] | [B, n], teacher [B, n+1] | [B] | [B, n])``.

    Example:
        >>> loss_fn = MarginMSELoss()
        >>> loss_fn(torch.randn(8, requires_grad=True), torch.randn(8, 3), torch.randn(8, 4)).backward()
    """

    def __init__(self, *, reduction: str = MarginMSEOptions.reduction, backend: str = "auto") -> None:
        super().__init__(MarginMSEOptions(reduction=reduction), backend)

    def forward(self, student_pos: torch.Tensor, student_neg: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """See :func:`margin_mse_loss`."""
        return margin_mse_loss(student_pos, student_neg, teacher, backend=self.backend, **self.option_kwargs())

    def from_embeddings(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor,
        teacher: torch.Tensor,
    ) -> torch.Tensor:
        """Dot-product scores inside the kernel; see :func:`margin_mse_from_embeddings`."""
        return margin_mse_from_embeddings(query, positive, negatives, teacher, backend=self.backend,
                                          **self.option_kwargs())
