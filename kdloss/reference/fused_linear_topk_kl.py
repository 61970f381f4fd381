"""Fused linear head + top-k sparse KL: the unfused pure-PyTorch reference (spec §3.7).

``topk_kl_reference(softcap(hidden @ weightᵀ + bias), ...)`` — it materialises the ``[N, V]``
logits; the kernel path never does.
"""

from __future__ import annotations

import torch

from .topk_kl import topk_kl_reference


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  softcap: float | None = None) -> torch.Tensor:
    """``hidden @ weightᵀ + bias``, then Gemma-style ``c·tanh(z / c)`` when ``softcap`` is given."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def fused_linear_topk_kl_reference(hidden, weight, teacher_ids, teacher_values, bias=None, labels=None, *,
                                   softcap=None, **options) -> torch.Tensor:
    """Shapes: ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]``; the rest as
    :func:`kdloss.reference.topk_kl_reference` (same keywords)."""
    return topk_kl_reference(linear_logits(hidden, weight, bias, softcap), teacher_ids, teacher_values, labels,
                             **options)
