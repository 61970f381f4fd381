"""Fused linear head + top-k sparse KL: ``fused_linear_topk_kl_loss`` and ``FusedLinearTopKKLLoss``.

The student's last hidden states and LM-head weight go in, the sparse teacher goes in, and the
loss and the gradients of hidden, weight and bias come out; the ``[N, V]`` logits are computed
chunk by chunk and never exist in full (see :mod:`kdloss._ops.fused_linear_topk_kl`). Semantics
and options are those of :func:`kdloss.functional.topk_kl_loss` applied to
``softcap(hidden @ weightᵀ + bias)``.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from . import _ops
from ._dispatch import use_kernel
from ._validation import BACKENDS, accumulation_dtype, check_option, check_same_device, check_same_dtype, check_tensor
from .reference.fused_linear_topk_kl import fused_linear_topk_kl_reference
from .topk_kl import (
    check_num_items,
    check_options,
    check_positive,
    check_teacher_tensors,
    check_teacher_values_data,
    mean_divisor,
    prepare_teacher,
)

__all__ = ["fused_linear_topk_kl_loss", "FusedLinearTopKKLLoss", "default_chunk_size"]

#: Logit elements per chunk by default (64 MiB of fp32): chunk rows = max(8, 2**24 // V).
CHUNK_ELEMENTS = 1 << 24


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk when ``chunk_size`` is None: about 2**24 logits per chunk, at least 8 rows."""
    return max(8, CHUNK_ELEMENTS // max(vocab, 1))


def _check_chunk_size(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {value!r}")
    return int(value)


def _check_softcap(value) -> float | None:
    return None if value is None else check_positive(value, "softcap")


def _check_head(hidden, weight, bias) -> int:
    check_tensor(hidden, "hidden")
    check_tensor(weight, "weight", ndim=2)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must be [N, H] (or [..., H]) with H >= 1, got shape {tuple(hidden.shape)}")
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]} (from hidden) and V >= 1, "
                         f"got shape {tuple(weight.shape)}")
    check_same_dtype(hidden=hidden, weight=weight)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V] with V = {weight.shape[0]} (from weight), got shape {tuple(bias.shape)}")
        check_same_dtype(hidden=hidden, bias=bias)
    return weight.shape[0]


def fused_linear_topk_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
    values: str = "logprobs",
    tail: str = "renorm",
    student_support: str = "full",
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Top-k sparse KL of the logits ``softcap(hidden @ weightᵀ + bias)`` without materialising them.

    Args:
        hidden: ``[N, H]`` (or ``[..., H]``) student hidden states before the LM head.
        weight: ``[V, H]`` LM-head weight (the tensor you are given — a full weight, or whatever
            your FSDP/ZeRO-3 wrapper has gathered; nothing is read from a model), same dtype as
            ``hidden``.
        teacher_ids, teacher_values, labels: ``[N, k]``, ``[N, k]``, ``[N]`` (leading dims of
            ``hidden``), as in :func:`kdloss.functional.topk_kl_loss`.
        bias: optional ``[V]`` LM-head bias.
        softcap: optional Gemma-style final-logit soft-cap ``c``: logits ``c·tanh(z / c)``
            (applied before the softmax). None (default) for none.
        chunk_size: rows per chunk (default :func:`default_chunk_size`: about 2**24 logits per
            chunk). Extra memory is O(chunk_size × V), independent of N.
        values, tail, student_support, temperature, teacher_temperature, scale_by_t2,
        ignore_index, reduction, num_items_in_batch, backend: as in
            :func:`kdloss.functional.topk_kl_loss` (``backend="reference"`` materialises the
            logits).

    Returns:
        The loss in ``hidden.dtype`` (a scalar, or ``[...]`` for ``reduction="none"``).
        Gradients flow to ``hidden``, ``weight`` and ``bias``. For scalar reductions they are
        computed during the forward (one GEMM pass) and held until the backward; the gradient of
        ``weight`` is accumulated over chunks in ``weight.dtype``.
    """
    vocab = _check_head(hidden, weight, bias)
    softcap = _check_softcap(softcap)
    chunk_size = _check_chunk_size(chunk_size)
    check_options(values=values, tail=tail, student_support=student_support, temperature=temperature,
                  teacher_temperature=teacher_temperature, scale_by_t2=scale_by_t2, ignore_index=ignore_index,
                  reduction=reduction)
    lead = tuple(hidden.shape[:-1])
    check_teacher_tensors(teacher_ids, teacher_values, labels, lead, names=("hidden", "[..., H]"))
    tensors = {"hidden": hidden, "weight": weight, "teacher_ids": teacher_ids, "teacher_values": teacher_values}
    tensors.update({name: t for name, t in (("bias", bias), ("labels", labels)) if t is not None})
    device = check_same_device(**tensors)
    num_items = check_num_items(num_items_in_batch, reduction, device)
    check_teacher_values_data(teacher_ids, teacher_values, labels, vocab, ignore_index)
    options = dict(values=values, tail=tail, student_support=student_support, temperature=float(temperature),
                   teacher_temperature=float(teacher_temperature), scale_by_t2=scale_by_t2,
                   ignore_index=ignore_index, reduction=reduction)
    if not use_kernel("topk_kl", device, backend):
        return fused_linear_topk_kl_reference(hidden, weight, teacher_ids, teacher_values, bias, labels,
                                              softcap=softcap, num_items_in_batch=num_items, **options)
    acc = accumulation_dtype(hidden.dtype)
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids, log_p, log_r, valid = prepare_teacher(
        teacher_ids, teacher_values, labels, flat.shape[0], values=values, tail=tail, temperature=temperature,
        teacher_temperature=teacher_temperature, ignore_index=ignore_index, acc=acc, device=device,
    )
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, *_ = torch.ops.kdloss.fused_linear_topk_kl_fwd(
        flat, weight, bias, ids, log_p, log_r, valid, mean_divisor(valid, num_items, acc), 1.0 / float(temperature),
        float(temperature) ** 2 if scale_by_t2 else 1.0, student_support == "full", _ops.REDUCTION_CODES[reduction],
        0.0 if softcap is None else softcap, chunk_size or default_chunk_size(vocab),
        needs_grad and reduction != "none",
    )
    return loss.reshape(lead) if reduction == "none" else loss


class FusedLinearTopKKLLoss(nn.Module):
    """Module form of :func:`fused_linear_topk_kl_loss` (same keywords, same defaults).

    ``FusedLinearTopKKLLoss(temperature=2.0)(hidden, lm_head.weight, teacher_ids, teacher_values,
    labels=labels)``; ``forward`` also takes ``bias`` and ``num_items_in_batch``.
    """

    def __init__(self, *, softcap: float | None = None, chunk_size: int | None = None, values: str = "logprobs",
                 tail: str = "renorm", student_support: str = "full", temperature: float = 1.0,
                 teacher_temperature: float = 1.0, scale_by_t2: bool = True, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        check_options(values=values, tail=tail, student_support=student_support, temperature=temperature,
                      teacher_temperature=teacher_temperature, scale_by_t2=scale_by_t2, ignore_index=ignore_index,
                      reduction=reduction)
        self._options = dict(
            softcap=_check_softcap(softcap), chunk_size=_check_chunk_size(chunk_size), values=values, tail=tail,
            student_support=student_support, temperature=float(temperature),
            teacher_temperature=float(teacher_temperature), scale_by_t2=scale_by_t2, ignore_index=ignore_index,
            reduction=reduction, backend=check_option(backend, "backend", BACKENDS),
        )

    def forward(self, hidden, weight, teacher_ids, teacher_values, bias=None, labels=None, num_items_in_batch=None):
        return fused_linear_topk_kl_loss(hidden, weight, teacher_ids, teacher_values, bias=bias, labels=labels,
                                         num_items_in_batch=num_items_in_batch, **self._options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options.items())
