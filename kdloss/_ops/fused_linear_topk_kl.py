"""``kdloss::fused_linear_topk_kl_*`` ops (spec §3.7, issue "fused linear head + top-k KL").

The LM head and the top-k KL loss in one op that never materialises the ``[N, V]`` logits: rows
are processed in chunks of ``chunk_size``; for each chunk the logits ``hidden_c @ weightᵀ + bias``
(optionally soft-capped, ``c·tanh(z/c)``) are computed with an ATen GEMM (MKL/oneDNN on CPU,
cuBLAS on CUDA), the streaming ``kdloss::topk_kl_fwd``/``_bwd`` kernels run on them, and the
chunk's logit gradient is folded back through two more GEMMs before the next chunk. Extra memory
is O(chunk_size × V) plus the gradients themselves.

* With ``compute_grad`` (a scalar loss that needs gradients) the forward also returns the
  gradients for an upstream gradient of 1 — one GEMM pass instead of two — and the backward
  scales them by the actual upstream gradient.
* Otherwise (``reduction="none"``, or no gradient needed in the forward) the backward recomputes
  each chunk's logits from the saved per-row log-sum-exp.

Op-level tensors are as for ``kdloss::topk_kl_*`` (see :mod:`kdloss._ops.topk_kl`) plus
``hidden [N, H]``, ``weight [V, H]`` and ``bias [V]`` (or None) of one float dtype. ``softcap`` is
0 for none. Both ops are implemented here in Python on top of the topk_kl kernels, for every
device that has them.
"""

from __future__ import annotations

import torch

from . import LIB

_TEACHER = ("Tensor ids, Tensor target_logp, Tensor tail_logp, Tensor valid, Tensor divisor, "
            "float inv_temperature, float scale, bool full_support, int reduction, float softcap, int chunk_size")
LIB.define(
    f"fused_linear_topk_kl_fwd(Tensor hidden, Tensor weight, Tensor? bias, {_TEACHER}, bool compute_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    f"fused_linear_topk_kl_bwd(Tensor grad, Tensor lse, Tensor hidden, Tensor weight, Tensor? bias, {_TEACHER}) "
    "-> (Tensor, Tensor, Tensor)"
)

_NONE, _MEAN = 0, 1


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_logits(hidden_c, weight, bias, softcap: float):
    """``[C, V]`` logits of a chunk of rows (soft-capped when ``softcap > 0``)."""
    logits = hidden_c @ weight.T if bias is None else torch.addmm(bias, hidden_c, weight.T)
    return softcap * torch.tanh(logits / softcap) if softcap > 0 else logits


def _accumulate_chunk_grads(grad_logits, capped, hidden_c, weight, softcap, grad_hidden_c, grad_weight, grad_bias):
    """Back through the soft-cap and the GEMM: ``grad_hidden_c = G·W``, ``grad_weight += Gᵀ·h``,
    ``grad_bias += Σ_rows G`` (``grad_weight``/``grad_bias`` may be None when not needed)."""
    if softcap > 0:  # d/dx c·tanh(x/c) = 1 − tanh² = 1 − (z/c)²
        grad_logits = grad_logits * (1 - (capped / softcap) ** 2)
    torch.mm(grad_logits, weight, out=grad_hidden_c)
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
    grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=_acc(bias.dtype), device=bias.device)
    return grad_hidden, grad_weight, grad_bias


def _teacher_slice(s, ids, target_logp, tail_logp, valid):
    return ids[s], target_logp[s], tail_logp[s], valid[s]


def _fwd_impl(hidden, weight, bias, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
              full_support, reduction, softcap, chunk_size, compute_grad):
    if compute_grad and reduction == _NONE:
        raise ValueError("compute_grad needs a scalar reduction (the upstream gradient of 'none' is per row)")
    rows = hidden.shape[0]
    acc = _acc(hidden.dtype)
    lse = torch.empty(rows, dtype=acc, device=hidden.device)
    row_losses = torch.empty(rows, dtype=hidden.dtype, device=hidden.device) if reduction == _NONE else None
    partial = []
    grads = _grad_buffers(hidden, weight, bias) if compute_grad else None
    one = torch.ones((), dtype=hidden.dtype, device=hidden.device)
    for s in _chunks(rows, chunk_size):
        teacher = _teacher_slice(s, ids, target_logp, tail_logp, valid)
        capped = chunk_logits(hidden[s], weight, bias, softcap)
        # "sum" per chunk; the mean's divisor is applied once, below
        loss_c, lse[s] = torch.ops.kdloss.topk_kl_fwd(capped, *teacher, divisor, inv_temperature, scale,
                                                      full_support, _NONE if reduction == _NONE else 2)
        if reduction == _NONE:
            row_losses[s] = loss_c
        else:
            partial.append(loss_c.to(acc))
        if compute_grad:
            grad_logits = torch.ops.kdloss.topk_kl_bwd(one, lse[s], capped, *teacher, divisor, inv_temperature,
                                                       scale, full_support, reduction)
            grad_hidden, grad_weight, grad_bias = grads
            _accumulate_chunk_grads(grad_logits, capped, hidden[s], weight, softcap, grad_hidden[s], grad_weight,
                                    grad_bias)
    if reduction == _NONE:
        loss = row_losses
    else:
        total = torch.stack(partial).sum() if partial else torch.zeros((), dtype=acc, device=hidden.device)
        if reduction == _MEAN:
            positive = divisor > 0
            total = torch.where(positive, total / torch.where(positive, divisor, torch.ones_like(divisor)),
                                torch.zeros_like(total))
        loss = total.to(hidden.dtype)
    if grads is None:  # distinct empty tensors: outputs must not alias
        return loss, lse, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    grad_hidden, grad_weight, grad_bias = grads
    return loss, lse, grad_hidden, grad_weight, (hidden.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype))


def _bwd_impl(grad, lse, hidden, weight, bias, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
              full_support, reduction, softcap, chunk_size):
    grad_hidden, grad_weight, grad_bias = _grad_buffers(hidden, weight, bias)
    for s in _chunks(hidden.shape[0], chunk_size):
        teacher = _teacher_slice(s, ids, target_logp, tail_logp, valid)
        capped = chunk_logits(hidden[s], weight, bias, softcap)
        grad_c = grad[s] if reduction == _NONE else grad
        grad_logits = torch.ops.kdloss.topk_kl_bwd(grad_c, lse[s], capped, *teacher, divisor, inv_temperature,
                                                   scale, full_support, reduction)
        _accumulate_chunk_grads(grad_logits, capped, hidden[s], weight, softcap, grad_hidden[s], grad_weight, grad_bias)
    return grad_hidden, grad_weight, (hidden.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype))


for _key in ("CPU", "CUDA"):
    LIB.impl("fused_linear_topk_kl_fwd", _fwd_impl, _key)
    LIB.impl("fused_linear_topk_kl_bwd", _bwd_impl, _key)


@torch.library.register_fake("kdloss::fused_linear_topk_kl_fwd")
def _fwd_fake(hidden, weight, bias, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
              full_support, reduction, softcap, chunk_size, compute_grad):
    rows = hidden.shape[0]
    loss = hidden.new_empty((rows,) if reduction == _NONE else ())
    lse = hidden.new_empty((rows,), dtype=_acc(hidden.dtype))
    if not compute_grad:
        return loss, lse, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    grad_bias = hidden.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    return loss, lse, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


@torch.library.register_fake("kdloss::fused_linear_topk_kl_bwd")
def _bwd_fake(grad, lse, hidden, weight, bias, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
              full_support, reduction, softcap, chunk_size):
    grad_bias = hidden.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, *teacher, compute_grad = inputs
    tensors, options = teacher[:5], teacher[5:]
    _, lse, *grads = output
    ctx.mark_non_differentiable(lse, *grads)
    ctx.precomputed = compute_grad
    ctx.has_bias = bias is not None
    ctx.options = tuple(options)
    if compute_grad:
        ctx.save_for_backward(*grads)
    else:
        ctx.save_for_backward(lse, hidden, weight, bias, *tensors)


def _backward(ctx, grad_loss, *_unused):
    if ctx.precomputed:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # out of place: with retain_graph the backward may run again on the same buffers
        grads = [grad_hidden * grad_loss, grad_weight * grad_loss, grad_bias * grad_loss if ctx.has_bias else None]
    else:
        lse, hidden, weight, bias, *teacher = ctx.saved_tensors
        grads = list(torch.ops.kdloss.fused_linear_topk_kl_bwd(grad_loss, lse, hidden, weight, bias, *teacher,
                                                              *ctx.options))
        if not ctx.has_bias:
            grads[2] = None
    return (*grads,) + (None,) * 12


torch.library.register_autograd("kdloss::fused_linear_topk_kl_fwd", _backward, setup_context=_setup_context)
