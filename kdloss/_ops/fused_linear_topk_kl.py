"""``kdloss::fused_linear_topk_kl_*`` ops: the LM head and the top-k KL loss in one op.

The LM head and the top-k KL loss in one op that never materialises the ``[N, V]`` logits: rows
are processed in chunks of ``chunk_size``; for each chunk the logits ``hidden_c @ weightᵀ + bias``
(optionally soft-capped, ``c·tanh(z/c)``) are computed with an ATen GEMM (MKL/oneDNN on CPU,
cuBLAS on CUDA), the top-k kernels (``kdloss::topk_kl_fwd_grad`` — loss and logit gradient in one
pass —, or ``_fwd`` / ``_bwd``) run on them, and the chunk's logit gradient is folded back through
the GEMMs of the wanted gradients before the next chunk. Extra memory is one chunk (O(chunk_size × V))
plus the wanted gradients themselves.

* ``grad_mask`` says which of ``hidden``, ``weight``, ``bias`` get a gradient; the others get an empty
  tensor, and neither their buffer nor their GEMM exists (a frozen head: no weight-gradient GEMM).
* With a gradient wanted (scalar reductions only) the forward also returns the wanted gradients for
  an upstream gradient of 1 — one GEMM pass instead of two — and the backward scales them in place by
  the actual upstream gradient (a device multiply: no host sync, no second copy).
* Otherwise (``reduction="none"``, float16 logits — whose gradient for an upstream gradient of 1 may
  exceed 65504 —, or a second backward with ``retain_graph``) the backward recomputes each chunk's logits
  from the saved per-row log-sum-exp, for the inputs that need a gradient; the backward op applies the
  upstream gradient before the chunk's logit gradient is rounded to the logits' dtype.
* ``weight_grad_dtype`` (None or a wider float dtype) is the dtype the weight gradient is accumulated
  in over chunks; the forward returns it in that dtype, the backward rounds it once to the weight's.

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

from .._validation import accumulation_dtype
from . import LIB, first_order_only, traced

_TEACHER = ("Tensor ids, Tensor target_logp, Tensor tail_logp, Tensor valid, Tensor divisor, "
            "Tensor inv_temperature, Tensor scale, bool full_support, int reduction, Tensor softcap, int chunk_size")
_GRADS = "bool[3] grad_mask, ScalarType? weight_grad_dtype"
LIB.define(
    f"fused_linear_topk_kl_fwd(Tensor hidden, Tensor weight, Tensor? bias, {_TEACHER}, {_GRADS}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    f"fused_linear_topk_kl_bwd(Tensor grad, Tensor stats, Tensor hidden, Tensor weight, Tensor? bias, {_TEACHER}, "
    f"{_GRADS}) -> (Tensor, Tensor, Tensor)"
)

_NONE = 0


def _grad_fakes(hidden, weight, bias, grad_mask, weight_grad_dtype, final: bool):
    """Fakes of the three gradients: empty when not wanted; the weight's in its accumulation dtype
    until ``final`` (the forward hands it to the backward unrounded)."""
    weight_dtype = weight.dtype
    if weight_grad_dtype is not None and not final:
        weight_dtype = torch.promote_types(weight.dtype, weight_grad_dtype)
    shapes = ((hidden, hidden.shape, hidden.dtype), (weight, weight.shape, weight_dtype),
              (bias, None if bias is None else bias.shape, None if bias is None else bias.dtype))
    return tuple(hidden.new_empty(0) if not want or t is None else t.new_empty(shape, dtype=dtype)
                 for want, (t, shape, dtype) in zip(grad_mask, shapes, strict=True))


@torch.library.register_fake("kdloss::fused_linear_topk_kl_fwd")
def _fwd_fake(hidden, weight, bias, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
              full_support, reduction, softcap, chunk_size, grad_mask, weight_grad_dtype):
    rows = hidden.shape[0]
    loss = hidden.new_empty((rows,) if reduction == _NONE else (), dtype=accumulation_dtype(hidden.dtype))
    stats = hidden.new_empty((rows, 2), dtype=accumulation_dtype(hidden.dtype))
    return loss, stats, *_grad_fakes(hidden, weight, bias, grad_mask, weight_grad_dtype, final=False)


@torch.library.register_fake("kdloss::fused_linear_topk_kl_bwd")
def _bwd_fake(grad, stats, hidden, weight, bias, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
              full_support, reduction, softcap, chunk_size, grad_mask, weight_grad_dtype):
    return _grad_fakes(hidden, weight, bias, grad_mask, weight_grad_dtype, final=True)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, *teacher, grad_mask, weight_grad_dtype = inputs
    # teacher: ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale, full_support,
    # reduction, softcap, chunk_size
    tensors = (*teacher[:7], teacher[9])
    _, stats, *grads = output
    ctx.mark_non_differentiable(stats, *grads)
    # no zero-filled "gradients" of the non-differentiable outputs (a [V, H] one among them)
    ctx.set_materialize_grads(False)
    ctx.has_bias = bias is not None
    ctx.options = (teacher[7], teacher[8], teacher[10], weight_grad_dtype)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    masked = [g if want else None for g, want in zip(grads, grad_mask, strict=True)] if any(grad_mask) else None
    ctx.grads = None
    ctx.saved_grads = False
    if masked is not None and traced(*grads):
        # under torch.compile / export the backward is a traced graph that runs once per backward:
        # the gradients are saved tensors there and scaled out of place (the compiler plans the memory)
        ctx.saved_grads = True
        ctx.save_for_backward(stats, hidden, weight, bias, *tensors, *grads)
        ctx.grad_mask = list(grad_mask)
        return
    # the inputs, for a backward that recomputes: "none", or a second backward (retain_graph)
    ctx.save_for_backward(stats, hidden, weight, bias, *tensors)
    # the gradients computed in the forward, held once: the first backward scales them in place and
    # hands them over (not saved tensors: those can be neither modified in place nor released early)
    ctx.grads = masked


def _scale_in_place(ctx, grad_loss):
    """The forward's gradients times the upstream gradient, in place (no copy, no host sync), each
    rounded to its input's dtype; the context lets go of them."""
    grads, ctx.grads = ctx.grads, None
    skip = _exactly_one_on_cpu(grad_loss)  # a pass over the weight gradient saved; never a device sync
    out = []
    for g, dtype in zip(grads, ctx.dtypes, strict=True):
        if g is not None:
            g = g if skip else g.mul_(grad_loss)
            if g.dtype != dtype:  # fp32 accumulation of a bf16/fp16 weight: rounded once, here
                g = g.to(dtype)
        out.append(g)
    return out


def _exactly_one_on_cpu(grad_loss) -> bool:
    """Whether the upstream gradient is exactly 1, asked only where that is free: a CPU tensor."""
    return grad_loss.device.type == "cpu" and not traced(grad_loss) and bool(grad_loss == 1)


def _scale_saved(ctx, grad_loss):
    """The traced form of :func:`_scale_in_place`: out of place, from saved tensors."""
    grads = ctx.saved_tensors[-3:]
    return [(g * grad_loss).to(dtype) if want else None
            for g, want, dtype in zip(grads, ctx.grad_mask, ctx.dtypes, strict=True)]


def _recomputed(ctx, grad_loss):
    """The gradients from the saved inputs: ``"none"`` (per-row upstream gradient) and float16 logits
    (whose gradient for an upstream gradient of 1 can overflow float16: the upstream factor comes first)
    take the backward op; a second backward of any other scalar loss (retain_graph) the forward's
    computation again, so that it rounds exactly as the first one did, then scaled."""
    stats, hidden, weight, bias, *teacher = ctx.saved_tensors
    *teacher, softcap = teacher
    full_support, reduction, chunk_size, weight_grad_dtype = ctx.options
    mask = list(ctx.needs_input_grad[:3])
    if reduction != _NONE and weight.dtype != torch.float16:
        _, _, *again = torch.ops.kdloss.fused_linear_topk_kl_fwd(
            hidden, weight, bias, *teacher, full_support, reduction, softcap, chunk_size, mask, weight_grad_dtype)
        ctx.grads = [g if want else None for g, want in zip(again, mask, strict=True)]
        return _scale_in_place(ctx, grad_loss)
    grads = torch.ops.kdloss.fused_linear_topk_kl_bwd(grad_loss, stats, hidden, weight, bias, *teacher, full_support,
                                                      reduction, softcap, chunk_size, mask, weight_grad_dtype)
    return [g if want else None for g, want in zip(grads, mask, strict=True)]


def _backward(ctx, grad_loss, *_unused):
    if grad_loss is None:  # no gradient reached the loss (grads are not materialised as zeros)
        ctx.grads = None
        return (None,) * 16
    # the gradients are first-order only (see first_order_only): computed without recording, also
    # under create_graph=True (the chunked GEMMs write into preallocated buffers)
    with torch.no_grad():
        if ctx.saved_grads:
            grads = _scale_saved(ctx, grad_loss)
        elif ctx.grads is not None:
            grads = _scale_in_place(ctx, grad_loss)
        else:
            grads = _recomputed(ctx, grad_loss)
        if not ctx.has_bias:
            grads[2] = None
    return (*first_order_only("fused_linear_topk_kl", *grads),) + (None,) * 13


torch.library.register_autograd("kdloss::fused_linear_topk_kl_fwd", _backward, setup_context=_setup_context)
