"""Fused linear head + top-k sparse KL: :func:`fused_linear_topk_kl_loss` and :class:`FusedLinearTopKKLLoss`.

The student's last hidden states and LM-head weight go in, the sparse teacher goes in, and the loss and
the gradients of hidden, weight and bias come out; the ``[N, V]`` logits are computed chunk by chunk and
never exist in full. Semantics and options are those of :func:`kdloss.topk_kl_loss` applied to
``softcap(hidden @ weightᵀ + bias)``.

The ops ``kdloss::fused_linear_topk_kl_fwd|bwd`` (schemas, fakes, autograd: :mod:`kdloss._ops.fused_linear_topk_kl`)
are implemented here, in Python, on top of the top-k kernels (``kdloss::topk_kl_fwd|bwd``): for each chunk
of rows the logits come from an ATen GEMM, the top-k kernels run on them, and the chunk's logit gradient
is folded back through two more GEMMs before the next chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops
from ._autocast import cast_loss, no_autocast
from ._dispatch import use_kernel
from ._options import OptionsModule
from ._topk import TopKKLOptions, check_teacher, check_teacher_data, teacher_targets, temperature_args
from ._validation import (
    accumulation_dtype,
    check_int,
    check_num_items,
    check_same_device,
    check_same_dtype,
    check_scale,
    check_tensor,
    mean_divisor,
)
from ._vocab_parallel import fused_linear_topk_kl_vocab_parallel, is_dtensor

__all__ = ["FusedLinearTopKKLLoss", "FusedLinearTopKKLOptions", "default_chunk_size", "fused_linear_topk_kl_loss"]

#: Logit elements per chunk by default (64 MiB of fp32): chunk rows = max(8, 2**24 // V).
CHUNK_ELEMENTS = 1 << 24
#: hidden dtypes accepted with an fp32 weight (what autocast produces from an fp32 model)
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_NONE, _MEAN, _SUM = (_ops.REDUCTION_CODES[r] for r in ("none", "mean", "sum"))


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk when ``chunk_size`` is None: about 2**24 logits per chunk, at least 8 rows."""
    return max(8, CHUNK_ELEMENTS // max(vocab, 1))


@dataclass(frozen=True)
class FusedLinearTopKKLOptions(TopKKLOptions):
    """Options of :func:`fused_linear_topk_kl_loss`: those of :class:`~kdloss.topk_kl.TopKKLOptions` plus

    Args:
        softcap: optional Gemma-style final-logit soft-cap ``c > 0``: logits ``c·tanh(z / c)`` (None: none).
        chunk_size: rows per chunk (None: :func:`default_chunk_size`).
    """

    softcap: float | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.softcap is not None:
            check_scale(self.softcap, "softcap")
        if self.chunk_size is not None:
            check_int(self.chunk_size, "chunk_size", low=1)


# ----------------------------------------------------------------------------------------------
# The ops' implementation (every device with top-k kernels)


def chunk_logits(hidden_c, weight, bias, softcap: float):
    """``[C, V]`` logits of a chunk of rows in the weight's dtype (soft-capped when ``softcap > 0``).
    ``hidden_c`` is already in that dtype (see :func:`_chunk_rows`)."""
    logits = hidden_c @ weight.T if bias is None else torch.addmm(bias, hidden_c, weight.T)
    return softcap * torch.tanh(logits / softcap) if softcap > 0 else logits


def _chunk_rows(hidden, s, weight):
    """The chunk ``hidden[s]`` in the weight's dtype: a bf16/fp16 hidden with an fp32 weight (what
    autocast produces) is upcast one chunk at a time — the weight is never copied."""
    return hidden[s].to(weight.dtype)


def _accumulate_chunk_grads(grad_logits, capped, hidden_c, weight, softcap, grad_hidden_c, grad_weight, grad_bias):
    """Back through the soft-cap and the GEMM: ``grad_hidden_c = G·W`` (rounded to its own dtype),
    ``grad_weight += Gᵀ·h``, ``grad_bias += Σ_rows G`` (``grad_weight``/``grad_bias`` may be None when
    not needed). ``hidden_c`` and ``G`` are in the weight's dtype."""
    if softcap > 0:  # d/dx c·tanh(x/c) = 1 − tanh² = 1 − (z/c)²
        grad_logits = grad_logits * (1 - (capped / softcap) ** 2)
    if grad_hidden_c.dtype == weight.dtype:
        torch.mm(grad_logits, weight, out=grad_hidden_c)
    else:
        grad_hidden_c.copy_(grad_logits @ weight)
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.T, hidden_c)
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0, dtype=grad_bias.dtype)


def _chunks(rows: int, chunk_size: int):
    for start in range(0, rows, chunk_size):
        yield slice(start, min(rows, start + chunk_size))


def _grad_buffers(hidden, weight, bias):
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros_like(weight)
    grad_bias = None
    if bias is not None:
        grad_bias = torch.zeros(bias.shape, dtype=accumulation_dtype(bias.dtype), device=bias.device)
    return grad_hidden, grad_weight, grad_bias


def _teacher_slice(s, ids, target_logp, tail_logp, valid):
    return ids[s], target_logp[s], tail_logp[s], valid[s]


def _counted_rows(hidden_c, valid_c):
    """The chunk's hidden states with the rows that do not count set to 0: they may hold anything
    (NaN included), and a zero logit gradient times NaN would still reach the weight gradient."""
    return torch.where(valid_c.unsqueeze(-1), hidden_c, torch.zeros((), dtype=hidden_c.dtype, device=hidden_c.device))


def _fwd_impl(hidden, weight, bias, *args):
    # an enclosing autocast must not reroute the chunk GEMMs (their dtypes are chosen here)
    with no_autocast(hidden.device.type):
        return _fwd_chunks(hidden, weight, bias, *args)


def _bwd_impl(grad, stats, hidden, weight, bias, *args):
    with no_autocast(hidden.device.type):
        return _bwd_chunks(grad, stats, hidden, weight, bias, *args)


def _fwd_chunks(hidden, weight, bias, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
                full_support, reduction, softcap_t, chunk_size, compute_grad):
    if compute_grad and reduction == _NONE:
        raise ValueError("compute_grad needs a scalar reduction (the upstream gradient of 'none' is per row)")
    softcap = float(softcap_t)  # a CPU scalar: no device sync
    rows = hidden.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    stats = torch.empty(rows, 2, dtype=acc, device=hidden.device)
    row_losses = torch.empty(rows, dtype=acc, device=hidden.device) if reduction == _NONE else None
    partial = []
    grads = _grad_buffers(hidden, weight, bias) if compute_grad else None
    one = torch.ones((), dtype=acc, device=hidden.device)
    for s in _chunks(rows, chunk_size):
        teacher = _teacher_slice(s, ids, target_logp, tail_logp, valid)
        hidden_c = _counted_rows(_chunk_rows(hidden, s, weight), valid[s])
        capped = chunk_logits(hidden_c, weight, bias, softcap)
        # "sum" per chunk; the mean's divisor is applied once, below
        loss_c, stats[s] = torch.ops.kdloss.topk_kl_fwd(capped, *teacher, divisor, inv_temperature, scale,
                                                        full_support, _NONE if reduction == _NONE else _SUM)
        if reduction == _NONE:
            row_losses[s] = loss_c
        else:
            partial.append(loss_c)
        if compute_grad:
            grad_logits = torch.ops.kdloss.topk_kl_bwd(one, stats[s], capped, *teacher, divisor, inv_temperature,
                                                       scale, full_support, reduction)
            grad_hidden, grad_weight, grad_bias = grads
            _accumulate_chunk_grads(grad_logits, capped, hidden_c, weight, softcap, grad_hidden[s], grad_weight,
                                    grad_bias)
    if reduction == _NONE:
        loss = row_losses
    else:
        total = torch.stack(partial).sum() if partial else torch.zeros((), dtype=acc, device=hidden.device)
        if reduction == _MEAN:
            positive = divisor > 0
            total = torch.where(positive, total / torch.where(positive, divisor, torch.ones_like(divisor)),
                                torch.zeros_like(total))
        loss = total  # in the accumulation dtype, like the top-k kernels' loss
    if grads is None:  # distinct empty tensors: outputs must not alias
        return loss, stats, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    grad_hidden, grad_weight, grad_bias = grads
    grad_bias = hidden.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype)
    return loss, stats, grad_hidden, grad_weight, grad_bias


def _bwd_chunks(grad, stats, hidden, weight, bias, ids, target_logp, tail_logp, valid, divisor, inv_temperature,
                scale, full_support, reduction, softcap_t, chunk_size):
    softcap = float(softcap_t)
    grad_hidden, grad_weight, grad_bias = _grad_buffers(hidden, weight, bias)
    for s in _chunks(hidden.shape[0], chunk_size):
        teacher = _teacher_slice(s, ids, target_logp, tail_logp, valid)
        hidden_c = _counted_rows(_chunk_rows(hidden, s, weight), valid[s])
        capped = chunk_logits(hidden_c, weight, bias, softcap)
        grad_c = grad[s] if reduction == _NONE else grad
        grad_logits = torch.ops.kdloss.topk_kl_bwd(grad_c, stats[s], capped, *teacher, divisor, inv_temperature,
                                                   scale, full_support, reduction)
        _accumulate_chunk_grads(grad_logits, capped, hidden_c, weight, softcap, grad_hidden[s], grad_weight, grad_bias)
    return grad_hidden, grad_weight, (hidden.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype))


for _key in ("CPU", "CUDA"):
    _ops.LIB.impl("fused_linear_topk_kl_fwd", _fwd_impl, _key)
    _ops.LIB.impl("fused_linear_topk_kl_bwd", _bwd_impl, _key)


# ----------------------------------------------------------------------------------------------
# Public API


def _check_head(hidden, weight, bias) -> int:
    check_tensor(hidden, "hidden")
    check_tensor(weight, "weight", ndim=2)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must be [N, H] (or [..., H]) with H >= 1, got shape {tuple(hidden.shape)}")
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]} (from hidden) and V >= 1, "
                         f"got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V] with V = {weight.shape[0]} (from weight), "
                             f"got shape {tuple(bias.shape)}")
    check_head_dtypes(hidden, weight, bias)
    return weight.shape[0]


def check_head_dtypes(hidden, weight, bias) -> torch.dtype:
    """``weight`` in ``hidden``'s dtype, or fp32 with a bf16/fp16 ``hidden``; ``bias`` in ``weight``'s.
    Returns the dtype of the logits (and of the loss outside autocast)."""
    if weight.dtype != hidden.dtype and not (hidden.dtype in _LOW_PRECISION and weight.dtype == torch.float32):
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), or be float32 with a bfloat16/"
                         f"float16 hidden (what autocast produces), got {weight.dtype}")
    if bias is not None:
        check_same_dtype(weight=weight, bias=bias)
    return weight.dtype


_D = FusedLinearTopKKLOptions


def fused_linear_topk_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = _D.softcap,
    chunk_size: int | None = _D.chunk_size,
    values: str = _D.values,
    tail: str = _D.tail,
    student_support: str = _D.student_support,
    temperature: float = _D.temperature,
    teacher_temperature: float = _D.teacher_temperature,
    scale_by_t2: bool = _D.scale_by_t2,
    ignore_index: int = _D.ignore_index,
    reduction: str = _D.reduction,
    num_items_in_batch: int | torch.Tensor | None = None,
    backend: str = "auto",
    vocab_parallel_group=None,
    all_reduce_hidden_grad: bool = True,
) -> torch.Tensor:
    """Top-k sparse KL of the logits ``softcap(hidden @ weightᵀ + bias)`` without materialising them.

    Args:
        hidden: ``[N, H]`` (or ``[..., H]``) student hidden states before the LM head.
        weight: ``[V, H]`` LM-head weight (the tensor you are given — a full weight, or whatever your
            FSDP/ZeRO-3 wrapper has gathered; nothing is read from a model): the dtype of ``hidden``, or
            fp32 with a bf16/fp16 ``hidden`` (what ``torch.autocast`` produces from an fp32 model). In the
            mixed case each chunk of ``hidden`` is upcast to fp32 and the logits come from fp32 GEMMs;
            the weight is never copied.
        teacher_ids, teacher_values, labels: ``[..., k]``, ``[..., k]``, ``[...]`` (leading dims of
            ``hidden``), as in :func:`kdloss.topk_kl_loss`.
        bias: optional ``[V]`` LM-head bias, in the dtype of ``weight``.
        softcap: optional Gemma-style final-logit soft-cap ``c``: logits ``c·tanh(z / c)`` (applied before
            the softmax). None (default) for none.
        chunk_size: rows per chunk (default :func:`default_chunk_size`: about 2**24 logits per chunk).
            Extra memory is O(chunk_size × V), independent of N.
        values, tail, student_support, temperature, teacher_temperature, scale_by_t2, ignore_index,
        reduction, num_items_in_batch, backend: as in :func:`kdloss.topk_kl_loss`
            (``backend="reference"`` materialises the logits).
        vocab_parallel_group: vocabulary (tensor) parallelism (default None: off). A process group (or 1-D
            ``DeviceMesh``) over which the head's rows are split: ``weight`` (and ``bias``) are then this
            rank's contiguous rows ``[V_r, H]`` (group-rank order, sizes may differ), ``hidden`` and the
            teacher are the same on every rank of the group, teacher ids are global. A ``DTensor`` weight
            sharded on dim 0 is handled this way (with ``hidden`` a DTensor replicated on that mesh
            dimension, or this argument given to confirm it). See docs/fused_linear_topk_kl.md.
        all_reduce_hidden_grad: with ``vocab_parallel_group``, sum the gradient of ``hidden`` over the group
            in the backward (default True: what the replicated input of a column-parallel layer needs).
            Set False when your framework reduces it already (for example Megatron's
            ``copy_to_tensor_model_parallel_region`` or a sequence-parallel gather in front of the head).

    Shape:
        ``hidden [..., H]``, ``weight [V, H]``, ``teacher_ids [..., k]``, ``teacher_values [..., k]``,
        ``labels [...]``, ``bias [V]``.

    Returns:
        The loss in the dtype of the logits (``hidden.dtype``; fp32 for a bf16/fp16 ``hidden`` with an
        fp32 ``weight``), and in fp32 under autocast like autocast's fp32 ops (a scalar, or ``[...]``
        for ``reduction="none"``). Gradients flow to ``hidden``, ``weight`` and ``bias``, each in its own
        dtype. For scalar reductions they are computed during the forward (one GEMM pass) and held
        until the backward; the gradient of ``weight`` is accumulated over chunks in ``weight.dtype``.
        The chunk GEMMs run in the dtypes above whether or not autocast is on.

    Example:
        >>> hidden = torch.randn(6, 16, requires_grad=True)
        >>> head = torch.nn.Linear(16, 100, bias=False)
        >>> top = torch.randn(6, 100).log_softmax(-1).topk(8)
        >>> fused_linear_topk_kl_loss(hidden, head.weight, top.indices, top.values).backward()

    References:
        Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training" (2024), for the chunked
        fused-linear pattern; the loss is :func:`kdloss.topk_kl_loss`'s.
    """
    options = FusedLinearTopKKLOptions(
        values=values, tail=tail, student_support=student_support, temperature=temperature,
        teacher_temperature=teacher_temperature, scale_by_t2=scale_by_t2, ignore_index=ignore_index,
        reduction=reduction, softcap=softcap, chunk_size=chunk_size,
    )
    if vocab_parallel_group is not None or is_dtensor(weight):
        return fused_linear_topk_kl_vocab_parallel(
            hidden, weight, teacher_ids, teacher_values, labels, bias=bias, options=options,
            num_items_in_batch=num_items_in_batch, backend=backend, group=vocab_parallel_group,
            all_reduce_hidden_grad=all_reduce_hidden_grad)
    vocab = _check_head(hidden, weight, bias)
    lead = tuple(hidden.shape[:-1])
    check_teacher(teacher_ids, teacher_values, labels, lead, "hidden [..., H]")
    tensors = {"hidden": hidden, "weight": weight, "teacher_ids": teacher_ids, "teacher_values": teacher_values}
    tensors.update({name: t for name, t in (("bias", bias), ("labels", labels)) if t is not None})
    device = check_same_device(**tensors)
    num_items = check_num_items(num_items_in_batch, reduction, device)
    check_teacher_data(teacher_ids, teacher_values, labels, vocab, options.ignore_index)
    logits_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if not use_kernel("fused_linear_topk_kl", device, backend):
        from .reference.fused_linear_topk_kl import fused_linear_topk_kl_reference

        loss = fused_linear_topk_kl_reference(hidden, weight, teacher_ids, teacher_values, labels, bias=bias,
                                              options=options, num_items_in_batch=num_items)
        return cast_loss(loss, logits_dtype)
    acc = accumulation_dtype(hidden.dtype)
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids, log_p, log_r, counted = teacher_targets(teacher_ids, teacher_values, labels, flat.shape[0], options, acc)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, *_ = torch.ops.kdloss.fused_linear_topk_kl_fwd(
        flat, weight, bias, ids, log_p, log_r, counted, mean_divisor(counted, num_items, acc),
        *temperature_args(options), options.student_support == "full", _ops.REDUCTION_CODES[reduction],
        _ops.float_arg(options.softcap or 0.0), chunk_size or default_chunk_size(vocab),
        needs_grad and reduction != "none",
    )
    return cast_loss(loss.reshape(lead) if reduction == "none" else loss, logits_dtype)


class FusedLinearTopKKLLoss(OptionsModule):
    """Module form of :func:`fused_linear_topk_kl_loss`: options in ``__init__``, tensors in ``forward``.

    Every option is an attribute that can be changed between calls; it is validated on assignment.

    Args:
        softcap, chunk_size, values, tail, student_support, temperature, teacher_temperature, scale_by_t2,
        ignore_index, reduction, backend: as in :func:`fused_linear_topk_kl_loss`.
        vocab_parallel_group, all_reduce_hidden_grad: as in :func:`fused_linear_topk_kl_loss`; plain attributes
            (runtime state, not options).

    Shape:
        ``forward(hidden [..., H], weight [V, H], teacher_ids [..., k], teacher_values [..., k],
        labels [...] = None, *, bias=None, num_items_in_batch=None)``.

    Example:
        >>> kd = FusedLinearTopKKLLoss(temperature=2.0)
        >>> hidden, head = torch.randn(6, 16, requires_grad=True), torch.nn.Linear(16, 100, bias=False)
        >>> top = torch.randn(6, 100).log_softmax(-1).topk(8)
        >>> kd(hidden, head.weight, top.indices, top.values).backward()
    """

    def __init__(
        self,
        *,
        softcap: float | None = _D.softcap,
        chunk_size: int | None = _D.chunk_size,
        values: str = _D.values,
        tail: str = _D.tail,
        student_support: str = _D.student_support,
        temperature: float = _D.temperature,
        teacher_temperature: float = _D.teacher_temperature,
        scale_by_t2: bool = _D.scale_by_t2,
        ignore_index: int = _D.ignore_index,
        reduction: str = _D.reduction,
        backend: str = "auto",
        vocab_parallel_group=None,
        all_reduce_hidden_grad: bool = True,
    ) -> None:
        options = FusedLinearTopKKLOptions(
            values=values, tail=tail, student_support=student_support, temperature=temperature,
            teacher_temperature=teacher_temperature, scale_by_t2=scale_by_t2, ignore_index=ignore_index,
            reduction=reduction, softcap=softcap, chunk_size=chunk_size,
        )
        super().__init__(options, backend)
        self.vocab_parallel_group = vocab_parallel_group
        self.all_reduce_hidden_grad = all_reduce_hidden_grad

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        teacher_ids: torch.Tensor,
        teacher_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See :func:`fused_linear_topk_kl_loss`."""
        return fused_linear_topk_kl_loss(hidden, weight, teacher_ids, teacher_values, labels, bias=bias,
                                         num_items_in_batch=num_items_in_batch, backend=self.backend,
                                         vocab_parallel_group=self.vocab_parallel_group,
                                         all_reduce_hidden_grad=self.all_reduce_hidden_grad, **self.option_kwargs())
