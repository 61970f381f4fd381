"""Token-wise contextual loss (TRG's ``L_inner``): :func:`token_contextual_loss` and :class:`TokenContextualLoss`.

Per image, the student's and the teacher's token relations ``CS = softmax_row(F·Fᵀ / √D)`` over its N
tokens (``D`` each model's own width), and their squared difference, ``mean_{b,i,j} (CS^T − CS^S)²``
(``nn.MSELoss``'s default). Raw tokens (no normalisation) and a row-wise softmax: the TRG paper does not
release code, and these are the choices closest to its formula. The CPU and CUDA kernels tile the
similarity rows and never store a ``[B, N, N]`` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops
from ._autocast import cast_loss
from ._dispatch import use_kernel
from ._options import OptionsModule
from ._validation import REDUCTIONS, check_option, check_same_device, check_tensor

__all__ = ["TokenContextualLoss", "TokenContextualOptions", "token_contextual_loss"]


@dataclass(frozen=True)
class TokenContextualOptions:
    """Options of :func:`token_contextual_loss`.

    Args:
        reduction: ``"mean"`` (default, over B·N·N), ``"sum"``, or ``"none"`` → ``[B, N]``: each row's
            mean over its N columns (so ``none.mean() == mean``).
    """

    reduction: str = "mean"

    def __post_init__(self) -> None:
        check_option(self.reduction, "reduction", REDUCTIONS)


def _check_tokens(student_tokens, teacher_tokens) -> torch.device:
    check_tensor(student_tokens, "student_tokens", ndim=3)
    check_tensor(teacher_tokens, "teacher_tokens", ndim=3)
    device = check_same_device(student_tokens=student_tokens, teacher_tokens=teacher_tokens)
    batch, n, ds = student_tokens.shape
    if teacher_tokens.shape[:2] != student_tokens.shape[:2]:
        raise ValueError(f"teacher_tokens must be [B, N, Dt] with B = {batch}, N = {n} (from student_tokens), "
                         f"got shape {tuple(teacher_tokens.shape)}")
    if ds == 0:
        raise ValueError(f"student_tokens must have a positive width Ds, got shape {tuple(student_tokens.shape)}")
    if teacher_tokens.shape[2] == 0:
        raise ValueError(f"teacher_tokens must have a positive width Dt, got shape {tuple(teacher_tokens.shape)}")
    return device


def token_contextual_loss(
    student_tokens: torch.Tensor,
    teacher_tokens: torch.Tensor,
    *,
    reduction: str = TokenContextualOptions.reduction,
    backend: str = "auto",
) -> torch.Tensor:
    """Token-wise contextual loss (TRG ``L_inner``).

    Args:
        student_tokens: ``[B, N, Ds]``, any float dtype; receives the gradient.
        teacher_tokens: ``[B, N, Dt]``, a constant (detached); ``Dt`` may differ from ``Ds``.
        reduction: ``"mean"`` (default, over B·N·N — ``nn.MSELoss``), ``"sum"``, or ``"none"`` → ``[B, N]``.
        backend: ``"auto"``, ``"kernel"`` or ``"reference"``. The kernels never store a ``[B, N, N]``
            tensor (O(B·N) extra memory).

    Shape:
        ``student_tokens [B, N, Ds]``, ``teacher_tokens [B, N, Dt]`` → a scalar, or ``[B, N]`` for ``"none"``.

    Returns:
        The loss in ``student_tokens.dtype`` (computed in fp32, fp64 for fp64; returned in fp32 under
        autocast). Empty inputs give 0.

    Example:
        >>> student = torch.randn(2, 16, 32, requires_grad=True)
        >>> token_contextual_loss(student, torch.randn(2, 16, 64)).backward()

    References:
        The TRG paper (Token-level Relationship Graph distillation), its token-wise contextual loss; no
        official code is public.
    """
    options = TokenContextualOptions(reduction=reduction)
    device = _check_tokens(student_tokens, teacher_tokens)
    if not use_kernel("token_contextual", device, backend):
        from .reference.token_contextual import token_contextual_reference

        return token_contextual_reference(student_tokens, teacher_tokens, options=options)
    with_grad = torch.is_grad_enabled() and student_tokens.requires_grad
    outputs = torch.ops.kdloss.token_contextual_fwd(
        student_tokens.contiguous(), teacher_tokens.detach().contiguous(), _ops.REDUCTION_CODES[reduction], with_grad
    )
    return cast_loss(outputs[0], student_tokens.dtype)


class TokenContextualLoss(OptionsModule):
    """Module form of :func:`token_contextual_loss`.

    Args:
        reduction, backend: as in :func:`token_contextual_loss`.

    Shape:
        ``forward(student_tokens [B, N, Ds], teacher_tokens [B, N, Dt])``.

    Example:
        >>> loss_fn = TokenContextualLoss()
        >>> loss_fn(torch.randn(2, 16, 32, requires_grad=True), torch.randn(2, 16, 64)).backward()
    """

    def __init__(self, *, reduction: str = TokenContextualOptions.reduction, backend: str = "auto") -> None:
        super().__init__(TokenContextualOptions(reduction=reduction), backend)

    def forward(self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
        """See :func:`token_contextual_loss`."""
        return token_contextual_loss(student_tokens, teacher_tokens, backend=self.backend, **self.option_kwargs())
