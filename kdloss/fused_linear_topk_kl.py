"""Fused linear head + top-k sparse KL: :func:`fused_linear_topk_kl_loss` and :class:`FusedLinearTopKKLLoss`.

The student's last hidden states and LM-head weight go in, the sparse teacher goes in, and the loss and
the gradients of hidden, weight and bias come out; the ``[N, V]`` logits are computed chunk by chunk and
never exist in full. Semantics and options are those of :func:`kdloss.topk_kl_loss` applied to
``softcap(hidden @ weightᵀ + bias)``.

The ops ``kdloss::fused_linear_topk_kl_fwd|bwd`` (schemas, fakes, autograd: :mod:`kdloss._ops.fused_linear_topk_kl`)
are implemented here, in Python, on top of the top-k kernels (``kdloss::topk_kl_fwd_grad``, ``_fwd``,
``_bwd``): for each chunk of rows the logits come from an ATen GEMM into a reused buffer, one top-k pass
gives the chunk's loss and logit gradient, and that gradient is folded back through the GEMMs of the
gradients that are wanted before the next chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops
from ._autocast import cast_loss, no_autocast
from ._dispatch import use_kernel
from ._options import OptionsModule
from ._topk import (
    TopKKLOptions,
    check_teacher,
    check_teacher_data,
    target_dtype,
    teacher_targets,
    temperature_args,
)
from ._validation import (
    accumulation_dtype,
    check_bool,
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

#: hidden dtypes accepted with an fp32 weight (what autocast produces from an fp32 model)
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_NONE, _MEAN, _SUM = (_ops.REDUCTION_CODES[r] for r in ("none", "mean", "sum"))
#: ``weight_grad_dtype`` values: None (the weight's dtype) or a wider float dtype to accumulate in
_WEIGHT_GRAD_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# Chunk size: chosen by bytes


#: Default byte budget of one chunk's ``[C, V]`` buffers (the logits, and on CUDA or with a soft-cap
#: their gradient too, in the logits' dtype; on CPU the gradient is otherwise written over the logits), per
#: device type. CPU: small enough that the fused head's peak extra memory stays a
#: fraction of the unfused head's, large enough for efficient GEMMs. CUDA: large chunks, so that the weight
#: is read few times per step and the top-k kernels get thousands of CTAs.
CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 512 << 20}
#: Fewest rows per chunk by default (when there are that many rows), whatever the vocabulary: below it
#: each chunk's GEMMs re-read the whole weight for too little work (on CPU, 27-row chunks at V = 151936
#: made the step 1.5x slower than eager's).
MIN_CHUNK_ROWS = {"cpu": 64, "cuda": 1024}
#: Chunks of at least this many rows are rounded down to a multiple of it (GEMM tile friendly).
ROW_ALIGN = 64


def gradient_over_logits(device: str | torch.device, softcap: bool) -> bool:
    """Whether a chunk's logit gradient is written over its logits (one ``[C, V]`` buffer, not two): on
    CPU without a soft-cap (whose backward needs the capped logits next to the gradient)."""
    return torch.device(device).type == "cpu" and not softcap


def chunk_row_bytes(vocab: int, dtype: torch.dtype = torch.float32, buffers: int = 2) -> int:
    """Bytes a chunk holds per row: ``buffers · V · itemsize`` (its logits, and its logit gradient unless
    that is written over them)."""
    return buffers * max(vocab, 1) * torch.empty((), dtype=dtype).element_size()


def default_chunk_size(vocab: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       chunk_bytes: int | None = None, softcap: bool = False) -> int:
    """Rows per chunk when ``chunk_size`` is None: the rows whose ``[C, V]`` buffers fit in ``chunk_bytes``
    (default :data:`CHUNK_BYTES` of the device type: 32 MiB on CPU, 512 MiB on CUDA), at least
    :data:`MIN_CHUNK_ROWS` (64 on CPU, 1024 on CUDA) unless ``chunk_bytes`` is given, at least 1, rounded
    down to a multiple of 64 from 64 rows on. The buffers are the logits and their gradient, or on CPU
    without a soft-cap the logits alone (the gradient is written over them).

    Args:
        vocab: ``V``, the rows of the weight.
        dtype: the logits' dtype (the weight's).
        device: where the head runs (its type picks the defaults).
        chunk_bytes: a byte budget instead of the device's default (then no minimum but 1 row).
        softcap: whether the logits are soft-capped.

    Returns:
        The rows per chunk (an int ≥ 1; a chunk never holds more rows than the input has).

    Example:
        >>> default_chunk_size(151936, torch.bfloat16, "cuda")
        1024
        >>> default_chunk_size(32000, torch.float32, "cpu")
        256
        >>> default_chunk_size(32000, torch.float32, "cpu", softcap=True)
        128
    """
    kind = torch.device(device).type
    budget = chunk_bytes if chunk_bytes is not None else CHUNK_BYTES.get(kind, CHUNK_BYTES["cuda"])
    rows = budget // chunk_row_bytes(vocab, dtype, 1 if gradient_over_logits(device, softcap) else 2)
    if chunk_bytes is None:
        rows = max(rows, MIN_CHUNK_ROWS.get(kind, MIN_CHUNK_ROWS["cuda"]))
    if rows >= ROW_ALIGN:
        rows -= rows % ROW_ALIGN
    return max(1, rows)


@dataclass(frozen=True)
class FusedLinearTopKKLOptions(TopKKLOptions):
    """Options of :func:`fused_linear_topk_kl_loss`: those of :class:`~kdloss.topk_kl.TopKKLOptions` plus

    Args:
        softcap: optional Gemma-style final-logit soft-cap ``c > 0``: logits ``c·tanh(z / c)`` (None: none).
        chunk_size: rows per chunk (None: chosen by bytes, see :func:`default_chunk_size`).
        chunk_bytes: byte budget of a chunk's logits and logit gradient, from which the rows per chunk
            follow (None: the device's default, see :func:`default_chunk_size`); not with ``chunk_size``.
        weight_grad_dtype: dtype in which the weight gradient is accumulated over chunks: None (the
            weight's) or ``torch.float32`` (fp32 accumulation for a bf16/fp16 weight, rounded once to the
            weight's dtype at the end; no effect on wider weights).
    """

    softcap: float | None = None
    chunk_size: int | None = None
    chunk_bytes: int | None = None
    weight_grad_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.softcap is not None:
            check_scale(self.softcap, "softcap")
        if self.chunk_size is not None:
            check_int(self.chunk_size, "chunk_size", low=1)
        if self.chunk_bytes is not None:
            check_int(self.chunk_bytes, "chunk_bytes", low=1)
            if self.chunk_size is not None:
                raise ValueError("chunk_bytes: give chunk_size (rows) or chunk_bytes (a byte budget), not both")
        if self.weight_grad_dtype is not None:
            if not isinstance(self.weight_grad_dtype, torch.dtype):
                raise TypeError(f"weight_grad_dtype must be None or a torch.dtype, got {self.weight_grad_dtype!r}")
            if self.weight_grad_dtype not in _WEIGHT_GRAD_DTYPES:
                raise ValueError(f"weight_grad_dtype must be None, torch.float32 or torch.float64, "
                                 f"got {self.weight_grad_dtype}")

    def rows_per_chunk(self, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
        """``chunk_size`` when given, else :func:`default_chunk_size` for these logits."""
        if self.chunk_size is not None:
            return self.chunk_size
        return default_chunk_size(vocab, dtype, device, self.chunk_bytes, softcap=self.softcap is not None)


# ----------------------------------------------------------------------------------------------
# The ops' implementation (every device with top-k kernels)


def chunk_logits(hidden_c, weight, bias, softcap: float):
    """``[C, V]`` logits of a chunk of rows in the weight's dtype (soft-capped when ``softcap > 0``).
    ``hidden_c`` is already in that dtype (see :func:`_chunk_rows`). Used by the vocabulary-parallel head."""
    logits = hidden_c @ weight.T if bias is None else torch.addmm(bias, hidden_c, weight.T)
    return softcap * torch.tanh(logits / softcap) if softcap > 0 else logits


def _chunk_rows(hidden, s, weight):
    """The chunk ``hidden[s]`` in the weight's dtype: a bf16/fp16 hidden with an fp32 weight (what
    autocast produces) is upcast one chunk at a time — the weight is never copied."""
    return hidden[s].to(weight.dtype)


def _accumulate_chunk_grads(grad_logits, capped, hidden_c, weight, softcap, grad_hidden_c, grad_weight, grad_bias):
    """Back through the soft-cap and the GEMM (the vocabulary-parallel head's form of :meth:`_Grads.fold`)."""
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
    """Every gradient's buffer (the vocabulary-parallel head's form of :meth:`_Grads.allocate`)."""
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros_like(weight)
    grad_bias = None
    if bias is not None:
        grad_bias = torch.zeros(bias.shape, dtype=accumulation_dtype(bias.dtype), device=bias.device)
    return grad_hidden, grad_weight, grad_bias


def _teacher_slice(s, ids, target_logp, tail_logp, valid):
    return ids[s], target_logp[s], tail_logp[s], valid[s]


#: CPU chunks of fewer rows compute their logits as ``(W·hᵀ)ᵀ`` (see :meth:`_Workspace.logits_of`); from
#: 256 rows on, ``h·Wᵀ`` runs as fast (2 threads, V = 32000) and needs no transient ``[V, C]`` product.
_DIRECT_GEMM_ROWS = 256


def _buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer of the chunk loop: on CPU from the top-k kernels' block cache, so that a
    training step reuses the previous step's mapped pages (see :func:`kdloss.empty_cache`)."""
    if device.type == "cpu":
        return torch.ops.kdloss.topk_kl_empty(list(shape), dtype)
    return torch.empty(shape, dtype=dtype, device=device)


class _Workspace:
    """The two buffers a chunk reuses: its counted hidden rows ``[C, H]`` and its logits ``[C, V]``,
    both in the weight's dtype, allocated once per call (the logit gradient comes from the top-k op)."""

    def __init__(self, hidden, weight, chunk_size: int):
        rows = min(chunk_size, hidden.shape[0])
        self.hidden = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
        self.logits = _buffer((rows, weight.shape[0]), weight.dtype, weight.device)

    def counted_rows(self, hidden, s, valid_c):
        """``hidden[s]`` in the weight's dtype with the rows that do not count set to 0: they may hold
        anything (NaN included), and a zero logit gradient times NaN would still reach the weight gradient."""
        rows = self.hidden[:s.stop - s.start]
        rows.copy_(hidden[s])
        return rows.masked_fill_(valid_c.logical_not().unsqueeze(-1), 0)

    def logits_of(self, hidden_c, weight, bias, softcap: float):
        """``softcap(hidden_c @ weightᵀ + bias)`` written into the logits buffer (no allocation)."""
        out = self.logits[:hidden_c.shape[0]]
        if out.device.type == "cpu" and out.shape[0] < _DIRECT_GEMM_ROWS:
            # MKL threads W·hᵀ ([V, C]) far better than h·Wᵀ for a short chunk (2 threads, C = 128,
            # V = 32000: 2x faster); the transposing copy is cheap, and the [V, C] product is freed
            # before the top-k op allocates the chunk's gradient (two [C, V]-sized buffers at a time)
            by_vocab = torch.mm(weight, hidden_c.T) if bias is None else torch.addmm(bias[:, None], weight, hidden_c.T)
            out.copy_(by_vocab.T)
            del by_vocab
        elif bias is None:
            torch.mm(hidden_c, weight.T, out=out)
        else:
            torch.addmm(bias, hidden_c, weight.T, out=out)
        if softcap > 0:
            out.div_(softcap).tanh_().mul_(softcap)
        return out


class _Grads:
    """The wanted gradients, each held once: ``hidden`` in its dtype (written chunk by chunk), ``weight``
    accumulated over chunks in ``weight_grad_dtype`` (the weight's unless a wider one is asked for),
    ``bias`` accumulated in fp32 (fp64 for fp64). Unwanted ones are None: no buffer, no GEMM."""

    def __init__(self, hidden, weight, bias, grad_mask, weight_grad_dtype):
        want_hidden, want_weight, want_bias = grad_mask
        self.hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if want_hidden else None
        self.weight = None
        if want_weight:  # not zero-filled: the first chunk's GEMM overwrites it (beta = 0)
            self.weight = _buffer(weight.shape, _weight_grad_dtype(weight.dtype, weight_grad_dtype), weight.device)
        self.weight_written = False
        self.bias = None
        if want_bias and bias is not None:
            self.bias = torch.zeros(bias.shape, dtype=accumulation_dtype(bias.dtype), device=bias.device)

    def fold(self, s, grad_logits, capped, hidden_c, weight, softcap: float):
        """Back through the soft-cap and the GEMM for rows ``s``: ``grad_hidden[s] = G·W``,
        ``grad_weight += Gᵀ·h``, ``grad_bias += Σ_rows G``. ``capped`` (the chunk's logits buffer) and
        ``grad_logits`` are overwritten."""
        if softcap > 0:  # d/dx c·tanh(x/c) = 1 − tanh² = 1 − (z/c)²: G ← G − G·(z/c)²
            capped.div_(softcap).square_()
            grad_logits.addcmul_(grad_logits, capped, value=-1)
        if self.hidden is not None:
            rows = self.hidden[s]
            if rows.dtype == weight.dtype:
                torch.mm(grad_logits, weight, out=rows)
            else:
                rows.copy_(grad_logits @ weight)
        if self.weight is not None:
            _add_weight_grad(self.weight, grad_logits, hidden_c, overwrite=not self.weight_written)
            self.weight_written = True
        if self.bias is not None:
            self.bias += grad_logits.sum(0, dtype=self.bias.dtype)

    def outputs(self, hidden, weight, bias, final: bool):
        """The three gradients (an empty tensor for each one not wanted); with ``final`` each in its
        input's dtype, else ``weight``'s left in its accumulation dtype until the backward scales it."""
        def empty():
            return hidden.new_empty(0)  # distinct empty tensors: outputs must not alias

        grad_weight = self.weight
        if grad_weight is not None and not self.weight_written:  # no rows
            grad_weight.zero_()
        if grad_weight is not None and final:
            grad_weight = grad_weight.to(weight.dtype)
        grad_bias = None if self.bias is None else self.bias.to(bias.dtype)
        return tuple(empty() if g is None else g for g in (self.hidden, grad_weight, grad_bias))


def _weight_grad_dtype(weight_dtype: torch.dtype, asked: torch.dtype | None) -> torch.dtype:
    return weight_dtype if asked is None else torch.promote_types(weight_dtype, asked)


def _add_weight_grad(grad_weight, grad_logits, hidden_c, overwrite: bool) -> None:
    """``grad_weight (+)= grad_logitsᵀ · hidden_c`` in place: overwritten (``beta = 0``: the buffer's
    prior contents, even NaN, are ignored) for the first chunk, accumulated after. A wider
    ``grad_weight`` (fp32 accumulation of a bf16/fp16 weight) takes cuBLAS's mixed-precision GEMM on
    CUDA, else upcast chunk operands."""
    beta = 0 if overwrite else 1
    if grad_weight.dtype == grad_logits.dtype:
        torch.addmm(grad_weight, grad_logits.T, hidden_c, beta=beta, out=grad_weight)
        return
    if grad_weight.is_cuda and grad_weight.dtype == torch.float32:
        try:
            torch.addmm(grad_weight, grad_logits.T, hidden_c, out_dtype=torch.float32, beta=beta, out=grad_weight)
            return
        except (RuntimeError, NotImplementedError):  # a torch without the mixed-precision addmm
            pass
    wide = grad_weight.dtype
    torch.addmm(grad_weight, grad_logits.T.to(wide), hidden_c.to(wide), beta=beta, out=grad_weight)


def _chunk_loss_and_logit_grad(capped, teacher, divisor, inv_temperature, scale, full_support, reduction):
    """The one place where the fused head calls the top-k kernels with a gradient wanted: one pass over
    the chunk's logits (``kdloss::topk_kl_fwd_grad``) gives its loss (for ``reduction``: a chunk's share
    of the mean is already divided by ``divisor``), its per-row stats and its logit gradient for an
    upstream gradient of 1. The teacher was validated by the caller (no in-kernel id check)."""
    return torch.ops.kdloss.topk_kl_fwd_grad(capped, *teacher, divisor, inv_temperature, scale, full_support,
                                             reduction, True, False)


def _fwd_impl(hidden, weight, bias, *args):
    # an enclosing autocast must not reroute the chunk GEMMs (their dtypes are chosen here)
    with no_autocast(hidden.device.type):
        return _fwd_chunks(hidden, weight, bias, *args)


def _bwd_impl(grad, stats, hidden, weight, bias, *args):
    with no_autocast(hidden.device.type):
        return _bwd_chunks(grad, stats, hidden, weight, bias, *args)


def _reduce(partial, divisor, reduction, acc, device, divided: bool):
    """The chunks' losses summed; for the mean divided by ``divisor`` (0 when it is ≤ 0) unless each
    chunk's share already was (``divided``)."""
    total = torch.stack(partial).sum() if partial else torch.zeros((), dtype=acc, device=device)
    if reduction == _MEAN and not divided:
        positive = divisor > 0
        total = torch.where(positive, total / torch.where(positive, divisor, torch.ones_like(divisor)),
                            torch.zeros_like(total))
    return total  # in the accumulation dtype, like the top-k kernels' loss


def _fwd_chunks(hidden, weight, bias, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
                full_support, reduction, softcap_t, chunk_size, grad_mask, weight_grad_dtype):
    grad_mask = (grad_mask[0], grad_mask[1], grad_mask[2] and bias is not None)
    compute_grad = any(grad_mask)
    if compute_grad and reduction == _NONE:
        raise ValueError("grad_mask needs a scalar reduction (the upstream gradient of 'none' is per row)")
    softcap = float(softcap_t)  # a CPU scalar: no device sync
    rows = hidden.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    stats = torch.empty(rows, 2, dtype=acc, device=hidden.device)
    row_losses = torch.empty(rows, dtype=acc, device=hidden.device) if reduction == _NONE else None
    partial = []
    work = _Workspace(hidden, weight, chunk_size)
    grads = _Grads(hidden, weight, bias, grad_mask, weight_grad_dtype) if compute_grad else None
    options = (divisor, inv_temperature, scale, full_support)
    in_place = gradient_over_logits(hidden.device, softcap > 0)
    for s in _chunks(rows, chunk_size):
        teacher = _teacher_slice(s, ids, target_logp, tail_logp, valid)
        hidden_c = work.counted_rows(hidden, s, teacher[3])
        capped = work.logits_of(hidden_c, weight, bias, softcap)
        if compute_grad and in_place:
            loss_c, stats[s] = torch.ops.kdloss.topk_kl_fwd_grad_(capped, *teacher, *options, reduction)
            grads.fold(s, capped, capped, hidden_c, weight, softcap)
        elif compute_grad:
            loss_c, stats[s], grad_logits = _chunk_loss_and_logit_grad(capped, teacher, *options, reduction)
            grads.fold(s, grad_logits, capped, hidden_c, weight, softcap)
            del grad_logits  # freed before the next chunk's is allocated: one chunk's gradient at a time
        else:  # "sum" per chunk; the mean's divisor is applied once, below
            loss_c, stats[s] = torch.ops.kdloss.topk_kl_fwd(capped, *teacher, *options,
                                                            _NONE if reduction == _NONE else _SUM)
        if reduction == _NONE:
            row_losses[s] = loss_c
        else:
            partial.append(loss_c)
    loss = row_losses if reduction == _NONE else _reduce(partial, divisor, reduction, acc, hidden.device,
                                                         divided=compute_grad)
    if grads is None:
        return loss, stats, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    return (loss, stats, *grads.outputs(hidden, weight, bias, final=False))


def _bwd_chunks(grad, stats, hidden, weight, bias, ids, target_logp, tail_logp, valid, divisor, inv_temperature,
                scale, full_support, reduction, softcap_t, chunk_size, grad_mask, weight_grad_dtype):
    softcap = float(softcap_t)
    grads = _Grads(hidden, weight, bias, grad_mask, weight_grad_dtype)
    if any(g is not None for g in (grads.hidden, grads.weight, grads.bias)):
        float16 = weight.dtype == torch.float16 and grad.numel() > 0
        down = _float16_headroom(grad, divisor, inv_temperature, scale, reduction) if float16 else None
        work = _Workspace(hidden, weight, chunk_size)
        for s in _chunks(hidden.shape[0], chunk_size):
            teacher = _teacher_slice(s, ids, target_logp, tail_logp, valid)
            hidden_c = work.counted_rows(hidden, s, teacher[3])
            capped = work.logits_of(hidden_c, weight, bias, softcap)
            grad_c = grad[s] if reduction == _NONE else grad
            if down is not None:
                grad_c = grad_c * down
            grad_logits = torch.ops.kdloss.topk_kl_bwd(grad_c, stats[s], capped, *teacher, divisor, inv_temperature,
                                                       scale, full_support, reduction)
            grads.fold(s, grad_logits, capped, hidden_c, weight, softcap)
            del grad_logits
        if down is not None:  # back up, exactly (a power of two), before the final rounding
            for g in (grads.hidden, grads.weight, grads.bias):
                if g is not None:
                    g.div_(down)
    return grads.outputs(hidden, weight, bias, final=True)


def _float16_headroom(grad, divisor, inv_temperature, scale, reduction):
    """A power of two ≤ 1 (a 0-d tensor; no host sync) for the upstream gradient of float16 logits: their
    chunk gradient, ``grad · scale/T`` per row (÷ divisor for the mean) times coefficients of order 1, is
    written in float16 and folded through float16 GEMMs, and at a small T it may exceed 65504 although
    the wanted gradients (scaled back by the inverse, exactly, before their own rounding) do not."""
    factor = grad.detach().abs().amax() * (float(scale) * float(inv_temperature))
    if reduction == _MEAN:
        factor = factor / divisor.clamp(min=1)
    return torch.exp2(-torch.ceil(torch.log2(factor))).clamp(max=1)


for _key in ("CPU", "CUDA"):
    _ops.LIB.impl("fused_linear_topk_kl_fwd", _fwd_impl, _key)
    _ops.LIB.impl("fused_linear_topk_kl_bwd", _bwd_impl, _key)


# ----------------------------------------------------------------------------------------------
# Public API


def _forward_grad_mask(hidden, weight, bias, reduction: str) -> list[bool]:
    """Which gradients (hidden, weight, bias) the forward computes: those of the inputs that require
    one, when autograd records and the reduction is a scalar (the backward of ``"none"`` recomputes).
    None for float16 logits: the forward's gradients are for an upstream gradient of 1 and held in the
    logits' dtype, and at a small temperature they may exceed float16's 65504 before the upstream factor
    brings them back; the backward op applies that factor before anything is rounded to float16."""
    if reduction == "none" or not torch.is_grad_enabled() or weight.dtype == torch.float16:
        return [False, False, False]
    return [t is not None and t.requires_grad for t in (hidden, weight, bias)]


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
    chunk_bytes: int | None = _D.chunk_bytes,
    weight_grad_dtype: torch.dtype | None = _D.weight_grad_dtype,
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
    validate: bool = True,
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
        chunk_size: rows per chunk (default: chosen by bytes, :func:`default_chunk_size` — the rows whose
            logits and logit gradient fit in 32 MiB on CPU, 512 MiB on CUDA, and at least 64 rows on CPU,
            1024 on CUDA). Extra memory is one chunk, ``2 · chunk_size · V`` logits (``chunk_size · V`` on
            CPU without a soft-cap: the gradient is written over the logits), plus the gradients wanted.
        chunk_bytes: instead of ``chunk_size``, the byte budget of a chunk's logits and logit gradient.
        weight_grad_dtype: None (default: the weight gradient is accumulated over chunks in the
            weight's dtype) or ``torch.float32``: accumulated in fp32 and rounded once to the weight's
            dtype (for bf16/fp16 weights; holds an fp32 ``[V, H]`` buffer instead of a bf16 one).
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
        validate: check the data of ``teacher_ids`` (in ``[0, V)``, unique among slots with teacher mass)
            and ``labels`` (default True): one host synchronisation per call, which ``validate=False``
            skips for hot loops. Without it a repeated id counts once per slot; ids outside ``[0, V)``
            still raise on CPU (the kernel checks them in its pass) and contribute nothing on CUDA.

    Shape:
        ``hidden [..., H]``, ``weight [V, H]``, ``teacher_ids [..., k]``, ``teacher_values [..., k]``,
        ``labels [...]``, ``bias [V]``.

    Returns:
        The loss in the dtype of the logits (``hidden.dtype``; fp32 for a bf16/fp16 ``hidden`` with an
        fp32 ``weight``), and in fp32 under autocast like autocast's fp32 ops (a scalar, or ``[...]``
        for ``reduction="none"``). Gradients flow to those of ``hidden``, ``weight`` and ``bias`` that
        require one, each in its own dtype; the others are neither computed nor allocated (a frozen
        head skips the weight-gradient GEMM). For scalar reductions they are computed during the forward
        (one GEMM pass) and held until the backward, which scales them in place by the upstream gradient;
        the gradient of ``weight`` is accumulated over chunks in ``weight_grad_dtype``. The chunk GEMMs
        run in the dtypes above whether or not autocast is on.

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
        reduction=reduction, softcap=softcap, chunk_size=chunk_size, chunk_bytes=chunk_bytes,
            weight_grad_dtype=weight_grad_dtype,
    )
    check_bool(validate, "validate")
    if vocab_parallel_group is not None or is_dtensor(weight):
        if options.weight_grad_dtype is not None:
            raise ValueError("weight_grad_dtype is not available with vocabulary parallelism (vocab_parallel_group "
                             "or a DTensor weight): the shard's gradient is accumulated in the weight's dtype")
        return fused_linear_topk_kl_vocab_parallel(
            hidden, weight, teacher_ids, teacher_values, labels, bias=bias, options=options,
            num_items_in_batch=num_items_in_batch, backend=backend, group=vocab_parallel_group,
            all_reduce_hidden_grad=all_reduce_hidden_grad, validate=validate)
    vocab = _check_head(hidden, weight, bias)
    lead = tuple(hidden.shape[:-1])
    check_teacher(teacher_ids, teacher_values, labels, lead, "hidden [..., H]")
    tensors = {"hidden": hidden, "weight": weight, "teacher_ids": teacher_ids, "teacher_values": teacher_values}
    tensors.update({name: t for name, t in (("bias", bias), ("labels", labels)) if t is not None})
    device = check_same_device(**tensors)
    num_items = check_num_items(num_items_in_batch, reduction, device)
    if validate:
        check_teacher_data(teacher_ids, teacher_values, labels, vocab, options.ignore_index)
    logits_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if not use_kernel("fused_linear_topk_kl", device, backend):
        from .reference.fused_linear_topk_kl import fused_linear_topk_kl_reference

        loss = fused_linear_topk_kl_reference(hidden, weight, teacher_ids, teacher_values, labels, bias=bias,
                                              options=options, num_items_in_batch=num_items)
        return cast_loss(loss, logits_dtype)
    acc = accumulation_dtype(hidden.dtype)
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids, log_p, log_r, counted = teacher_targets(teacher_ids, teacher_values, labels, flat.shape[0], options,
                                               target_dtype(hidden.device, acc))
    loss, *_ = torch.ops.kdloss.fused_linear_topk_kl_fwd(
        flat, weight, bias, ids, log_p, log_r, counted, mean_divisor(counted, num_items, acc),
        *temperature_args(options), options.student_support == "full", _ops.REDUCTION_CODES[reduction],
        _ops.float_arg(options.softcap or 0.0), options.rows_per_chunk(vocab, weight.dtype, device),
        _forward_grad_mask(flat, weight, bias, reduction), options.weight_grad_dtype,
    )
    return cast_loss(loss.reshape(lead) if reduction == "none" else loss, logits_dtype)


class FusedLinearTopKKLLoss(OptionsModule):
    """Module form of :func:`fused_linear_topk_kl_loss`: options in ``__init__``, tensors in ``forward``.

    Every option is an attribute that can be changed between calls; it is validated on assignment.

    Args:
        softcap, chunk_size, chunk_bytes, weight_grad_dtype, values, tail, student_support, temperature,
        teacher_temperature, scale_by_t2, ignore_index, reduction, backend: as in :func:`fused_linear_topk_kl_loss`.
        vocab_parallel_group, all_reduce_hidden_grad, validate: as in :func:`fused_linear_topk_kl_loss`; plain
            attributes (runtime state, not options).

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
        chunk_bytes: int | None = _D.chunk_bytes,
        weight_grad_dtype: torch.dtype | None = _D.weight_grad_dtype,
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
        validate: bool = True,
    ) -> None:
        options = FusedLinearTopKKLOptions(
            values=values, tail=tail, student_support=student_support, temperature=temperature,
            teacher_temperature=teacher_temperature, scale_by_t2=scale_by_t2, ignore_index=ignore_index,
            reduction=reduction, softcap=softcap, chunk_size=chunk_size, chunk_bytes=chunk_bytes,
            weight_grad_dtype=weight_grad_dtype,
        )
        super().__init__(options, backend)
        self.vocab_parallel_group = vocab_parallel_group
        self.all_reduce_hidden_grad = all_reduce_hidden_grad
        self.validate = validate

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
                                         all_reduce_hidden_grad=self.all_reduce_hidden_grad, validate=self.validate,
                                         **self.option_kwargs())
