"""Token-wise contextual loss reference (TRG's L_inner).

Per image, ``CS = softmax_row(F·Fᵀ / √D)`` over its N tokens, computed for the student (width Ds)
and the teacher (width Dt, a constant), and ``L = mean_{b,i,j} (CS^T_bij − CS^S_bij)²``
(``nn.MSELoss`` default, over B·N·N). The paper leaves these open; kdloss uses raw tokens (no normalisation),
row-wise softmax, mean reduction.
"""

from __future__ import annotations

import math

import torch

from .._autocast import cast_loss, no_autocast
from .._validation import accumulation_dtype
from ..token_contextual import TokenContextualOptions
from ._reduce import reduce_terms

__all__ = ["contextual_similarity", "token_contextual_reference"]


def contextual_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """``softmax(F·Fᵀ / √D)`` row-wise for ``tokens [B, N, D]`` → ``[B, N, N]`` (in tokens' dtype)."""
    dim = tokens.shape[-1]
    return torch.softmax(tokens @ tokens.transpose(-1, -2) / math.sqrt(dim), dim=-1)


def token_contextual_reference(
    student_tokens: torch.Tensor,
    teacher_tokens: torch.Tensor,
    *,
    options: TokenContextualOptions | None = None,
    **option_kwargs,
) -> torch.Tensor:
    """``student_tokens [B, N, Ds]``, ``teacher_tokens [B, N, Dt]`` → the loss in the student's dtype
    (fp32 under autocast).

    ``reduction``: ``"mean"`` over B·N·N, ``"sum"``, or ``"none"`` → ``[B, N]``, the mean over the
    N columns of each row (so that ``none.mean() == mean``). Options as a
    :class:`~kdloss.token_contextual.TokenContextualOptions` or its keywords.
    """
    reduction = (options or TokenContextualOptions(**option_kwargs)).reduction
    acc = accumulation_dtype(student_tokens.dtype)
    with no_autocast(student_tokens.device.type):  # the similarity GEMMs stay in acc
        cs = contextual_similarity(student_tokens.to(acc))
        ct = contextual_similarity(teacher_tokens.detach().to(acc))
    squared = (ct - cs) ** 2
    batch, n = student_tokens.shape[0], student_tokens.shape[1]
    if reduction == "none":
        out = squared.mean(-1) if n > 0 else squared.sum(-1)
        return cast_loss(out.reshape(batch, n), student_tokens.dtype)
    return reduce_terms(squared, reduction, student_tokens.dtype)
