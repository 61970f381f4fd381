"""The reduction shared by the references whose terms all count."""

from __future__ import annotations

import torch


def reduce_terms(terms: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """``"none"``: ``terms`` as they are; ``"sum"``: their sum; ``"mean"``: their mean, 0 (never NaN)
    when there are none. The result is cast to ``dtype``."""
    if reduction == "none":
        return terms.to(dtype)
    total = terms.sum()
    if reduction == "mean" and terms.numel() > 0:
        total = total / terms.numel()
    return total.to(dtype)
