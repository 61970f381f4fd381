"""The reduction shared by the references whose terms all count."""

from __future__ import annotations

import torch

from .._autocast import cast_loss


def reduce_terms(terms: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """``"none"``: ``terms`` as they are; ``"sum"``: their sum; ``"mean"``: their mean, 0 (never NaN)
    when there are none. The result is cast to ``dtype`` (outside autocast; under autocast it stays in
    the accumulation dtype of ``terms``)."""
    if reduction == "none":
        return cast_loss(terms, dtype)
    total = terms.sum()
    if reduction == "mean" and terms.numel() > 0:
        total = total / terms.numel()
    return cast_loss(total, dtype)
