"""``kdloss::fused_linear_topk_kl_*`` ops: the LM head and the top-k KL loss in one op.

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
``hidden [N, H]``, ``weight [V, H]`` and ``bias [V]`` (or None) of one float dtype — or a bf16/fp16
``hidden`` with an fp32 ``weight``/``bias`` (computed in fp32, chunk by chunk). The loss and the
per-row ``stats`` are in the accumulation dtype of ``hidden`` (fp32; fp64 for fp64); each gradient in
its input's dtype. ``softcap`` (a 0-d float64 CPU tensor like ``inv_temperature`` and ``scale``) is 0
for none. Both ops are implemented in Python on top of the topk_kl kernels, for every device that has
them (:mod:`kdloss.fused_linear_topk_kl`); this module holds their schemas, fakes and autograd formula
only.
"""

from __future__ import annotations

import torch

from . import LIB, first_order_only

_TEACHER = ("Tensor ids, Tensor target_logp, Tensor tail_logp, Tensor valid, Tensor divisor, "
            "Tensor inv_temperature, Tensor scale, bool full_support, int reduction, Tensor softcap, int chunk_size")
LIB.define(
    f"fused_linear_topk_kl_fwd(Tensor hidden, Tensor weight, Tensor? bias, {_TEACHER}, bool compute_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    f"fused_linear_topk_kl_bwd(Tensor grad, Tensor stats, Tensor hidden, Tensor weight, Tensor? bias, {_TEACHER}) "
    "-> (Tensor, Tensor, Tensor)"
)

_NONE = 0


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("kdloss::fused_linear_topk_kl_fwd")
def _fwd_fake(hidden, weight, bias, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
              full_support, reduction, softcap, chunk_size, compute_grad):
    rows = hidden.shape[0]
    loss = hidden.new_empty((rows,) if reduction == _NONE else (), dtype=_acc(hidden.dtype))
    stats = hidden.new_empty((rows, 2), dtype=_acc(hidden.dtype))
    if not compute_grad:
        return loss, stats, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    grad_bias = hidden.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    return loss, stats, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


@torch.library.register_fake("kdloss::fused_linear_topk_kl_bwd")
def _bwd_fake(grad, stats, hidden, weight, bias, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
              full_support, reduction, softcap, chunk_size):
    grad_bias = hidden.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, *teacher, compute_grad = inputs
    # teacher: ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale, full_support,
    # reduction, softcap, chunk_size
    tensors = (*teacher[:7], teacher[9])
    _, stats, *grads = output
    ctx.mark_non_differentiable(stats, *grads)
    ctx.precomputed = compute_grad
    ctx.has_bias = bias is not None
    ctx.options = (teacher[7], teacher[8], teacher[10])
    if compute_grad:
        ctx.save_for_backward(*grads)
    else:
        ctx.save_for_backward(stats, hidden, weight, bias, *tensors)


def _backward(ctx, grad_loss, *_unused):
    # the gradients are first-order only (see first_order_only): computed without recording, also
    # under create_graph=True (the chunked GEMMs write into preallocated buffers)
    with torch.no_grad():
        if ctx.precomputed:
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            # out of place: with retain_graph the backward may run again on the same buffers
            # the upstream gradient is in the accumulation dtype: scale there, round once to each input's dtype
            grads = [(g * grad_loss).to(g.dtype) if g is not None else None
                     for g in (grad_hidden, grad_weight, grad_bias if ctx.has_bias else None)]
        else:
            stats, hidden, weight, bias, *teacher = ctx.saved_tensors
            *teacher, softcap = teacher
            full_support, reduction, chunk_size = ctx.options
            grads = list(torch.ops.kdloss.fused_linear_topk_kl_bwd(grad_loss, stats, hidden, weight, bias, *teacher,
                                                                  full_support, reduction, softcap, chunk_size))
            if not ctx.has_bias:
                grads[2] = None
    return (*first_order_only("fused_linear_topk_kl", *grads),) + (None,) * 12


torch.library.register_autograd("kdloss::fused_linear_topk_kl_fwd", _backward, setup_context=_setup_context)
