"""Fused linear head + top-k sparse KL: the unfused pure-PyTorch reference.

``topk_kl_reference(softcap(hidden @ weightᵀ + bias), ...)`` — it materialises the ``[N, V]``
logits; the kernel path never does.
"""

from __future__ import annotations

import torch

from .._autocast import no_autocast
from .._validation import comparable
from ..fused_linear_topk_kl import FusedLinearTopKKLOptions
from .topk_kl import topk_kl_reference

__all__ = ["fused_linear_topk_kl_reference", "linear_logits"]


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  softcap: float | None = None) -> torch.Tensor:
    """``hidden @ weightᵀ + bias``, then Gemma-style ``c·tanh(z / c)`` when ``softcap`` is given. A
    bf16/fp16 ``hidden`` with an fp32 ``weight`` is upcast; the GEMM never runs under autocast. The
    product and the bias are added before one rounding to the logits' dtype (``F.linear``, as
    ``nn.Linear`` computes them): a separate ``+ bias`` would round bf16/fp16 logits twice."""
    with no_autocast(hidden.device.type):
        logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def fused_linear_topk_kl_reference(hidden, weight, teacher_ids, teacher_values, labels=None, *, bias=None,
                                   num_items_in_batch=None, options: FusedLinearTopKKLOptions | None = None,
                                   **option_kwargs) -> torch.Tensor:
    """Shapes: ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]``; the rest as
    :func:`kdloss.reference.topk_kl_reference`. Options as a
    :class:`~kdloss.fused_linear_topk_kl.FusedLinearTopKKLOptions` or its keywords (``chunk_size`` is
    irrelevant here)."""
    options = options or FusedLinearTopKKLOptions(**option_kwargs)
    if labels is not None:  # ignored rows may hold anything: never read, not even into the weight gradient
        counted = (comparable(labels) != options.ignore_index).unsqueeze(-1)
        hidden = torch.where(counted, hidden, torch.zeros_like(hidden))
    logits = linear_logits(hidden, weight, bias, options.softcap)
    return topk_kl_reference(logits, teacher_ids, teacher_values, labels, options=options,
                             num_items_in_batch=num_items_in_batch)
