"""``kdloss::topk_kl_*`` ops: schemas, fakes and autograd.

Op-level contract (the public functions in :mod:`kdloss.topk_kl` normalise user input first):

* ``logits [N, V]`` — student logits, any float dtype, unit stride along V (any row stride);
* ``ids [N, k]`` int64 in ``[0, V)``; ``target_logp [N, k]`` teacher log-targets ``log p̂`` and
  ``tail_logp [N]`` tail bucket ``log r̂`` (−inf: no tail), both in the accumulation dtype (fp32;
  fp64 for fp64 logits) or float64 (CUDA: the accumulation dtype only), contiguous; slots with
  ``log p̂ = −inf`` are not part of K. The CPU kernels read them in double, and the public functions
  hand them float64 on CPU: at a large ``T·scale`` an fp32 ``p̂`` alone is most of a kept slot's error;
* ``valid [N]`` bool — rows that count (others give 0 and a zero gradient and are never read);
* ``divisor`` 0-d, accumulation dtype — the ``"mean"`` denominator (≤ 0 gives 0);
* ``inv_temperature`` = 1/T and ``scale`` = T² or 1 as 0-d float64 CPU tensors
  (:func:`kdloss._ops.float_arg`), ``full_support`` (student log-softmax over V, else over K),
  ``reduction`` 0 none / 1 mean / 2 sum.

``logits`` may also be ``[B, T, V]`` with any batch and row strides (row ``n`` is ``(n // T, n % T)``,
``N = B·T``): the label-shift slice ``full[:, :-1]`` is read in place; gradients have the logits' shape.

``topk_kl_fwd`` returns ``(loss, stats)``: the loss (``[N]`` for none, else a scalar) and per-row
``stats [N, 2]``, both in the accumulation dtype (the public function rounds the loss to the logits'
dtype outside autocast); ``stats`` is saved for the backward (not differentiable): ``m``, the largest
logit over V (over K for ``full_support=False``), and ``l = log Σ exp((z − m)/T)`` over the same set,
so that ``log q_j = (z_j − m)/T − l`` and ``m/T + l`` is the row's log-sum-exp of ``z/T``. (The CPU
kernels move ``m`` by ``T·(l₆₄ − l)`` — a few of its last units at most — so that the pair keeps the
float64 log-sum-exp and not only the rounded ``l``: at a large T that rounding is most of the backward's
error in a kept slot's gradient.) The logits are shifted by their maximum *before* the division
by T: ``z/T`` itself (or a log-sum-exp of it) would be large at small T, and rounding it would cost
absolute accuracy in every ``log q_j``. ``topk_kl_bwd`` writes the dense ``[N, V]`` gradient from
them in one pass (``g·(α·q_j + β_j·[j∈K])``).

``topk_kl_fwd_grad`` (the path of :func:`kdloss.topk_kl_loss`) returns ``(loss, stats, grad)``: with
``compute_grad`` also the logits' gradient for an upstream gradient of 1, computed in the same pass over the
logits (``grad`` is empty otherwise, and nothing of size N×V is written); its backward returns that gradient
as is when the upstream gradient is exactly 1 (read on the host only for CPU tensors) and otherwise scales it
(per row for ``reduction=0``), and without ``compute_grad`` recomputes it with ``topk_kl_bwd`` from
``stats``. ``topk_kl_fwd_grad_`` (CPU; the fused head's chunks) is ``topk_kl_fwd_grad`` with ``compute_grad`` and
without ``check_unique``, writing the gradient over the (contiguous) logits and returning ``(loss, stats)``.
``check_unique`` rejects an id repeated among a counted row's kept slots (``ValueError`` on CPU;
the CUDA kernels cannot raise and ignore the flag). Otherwise a repeated id counts once per slot — its
gradient entries are summed, race-free — on every device and in every op.
"""

import torch

from .._validation import accumulation_dtype
from . import LIB, first_order_only, traced

_ARGS = (
    "Tensor ids, Tensor target_logp, Tensor tail_logp, Tensor valid, Tensor divisor, "
    "Tensor inv_temperature, Tensor scale, bool full_support, int reduction"
)
LIB.define(f"topk_kl_fwd(Tensor logits, {_ARGS}) -> (Tensor, Tensor)")
LIB.define(f"topk_kl_bwd(Tensor grad, Tensor stats, Tensor logits, {_ARGS}) -> Tensor")
LIB.define(
    f"topk_kl_fwd_grad(Tensor logits, {_ARGS}, bool compute_grad, bool check_unique) -> (Tensor, Tensor, Tensor)"
)
# CPU only, inside the fused head: topk_kl_fwd_grad with the gradient written over the contiguous logits.
LIB.define(f"topk_kl_fwd_grad_(Tensor(a!) logits, {_ARGS}) -> (Tensor, Tensor)")
# The one-pass gradient times the upstream gradient, in place; rows whose factor is exactly 1 are skipped
# on the device (the eager CUDA backward: no host sync, no pass for the common upstream gradient of 1).
LIB.define("topk_kl_rescale_(Tensor(a!) grad, Tensor grad_loss, int reduction) -> ()")
# Frees the CPU kernels' idle gradient blocks (see kdloss.empty_cache); returns their size in bytes.
LIB.define("topk_kl_release_buffers() -> int")
# An uninitialised CPU tensor from the same block cache (the fused head's weight gradient and chunk logits).
LIB.define("topk_kl_empty(int[] size, ScalarType dtype) -> Tensor")
_NONE = 0


@torch.library.register_fake("kdloss::topk_kl_fwd")
def _topk_kl_fwd_fake(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
                      full_support, reduction):
    rows = ids.shape[0]
    acc = accumulation_dtype(logits.dtype)
    loss = logits.new_empty((rows,) if reduction == 0 else (), dtype=acc)
    return loss, logits.new_empty((rows, 2), dtype=acc)


@torch.library.register_fake("kdloss::topk_kl_bwd")
def _topk_kl_bwd_fake(grad, stats, logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature,
                      scale, full_support, reduction):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    *tensors, full_support, reduction = inputs  # tensors: logits … divisor, inv_temperature, scale
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(stats, *tensors)
    ctx.options = (full_support, reduction)


def _topk_kl_backward(ctx, grad_loss, _grad_stats):
    stats, *tensors = ctx.saved_tensors
    grad = torch.ops.kdloss.topk_kl_bwd(grad_loss, stats, *tensors, *ctx.options)
    (grad,) = first_order_only("topk_kl", grad)
    return (grad,) + (None,) * 9


torch.library.register_autograd("kdloss::topk_kl_fwd", _topk_kl_backward, setup_context=_setup_context)


@torch.library.register_fake("kdloss::topk_kl_fwd_grad")
def _topk_kl_fwd_grad_fake(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
                           full_support, reduction, compute_grad, check_unique):
    loss, stats = _topk_kl_fwd_fake(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
                                    full_support, reduction)
    return loss, stats, logits.new_empty(logits.shape if compute_grad else (0,))


@torch.library.register_fake("kdloss::topk_kl_fwd_grad_")
def _topk_kl_fwd_grad_in_place_fake(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
                                    full_support, reduction):
    return _topk_kl_fwd_fake(logits, ids, target_logp, tail_logp, valid, divisor, inv_temperature, scale,
                             full_support, reduction)


@torch.library.register_fake("kdloss::topk_kl_rescale_")
def _topk_kl_rescale_fake(grad, grad_loss, reduction):
    return None


def _setup_context_grad(ctx, inputs, output):
    *tensors, full_support, reduction, compute_grad, _check_unique = inputs
    _, stats, grad = output
    ctx.mark_non_differentiable(stats, grad)
    ctx.set_materialize_grads(False)  # no [N, V] zeros for the gradient output's own (unused) gradient
    ctx.precomputed = compute_grad
    ctx.options = (full_support, reduction)
    ctx.held = None
    if compute_grad and grad.is_cuda and not traced(grad):
        # held, not saved: the backward scales it in place on the device and hands it over
        ctx.held = grad
    elif compute_grad:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(stats, *tensors)


def _is_exactly_one(grad_loss: torch.Tensor) -> bool:
    """Whether the upstream gradient is exactly 1, when that is free to know (a CPU tensor, eager)."""
    if grad_loss.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch._guards.detect_fake_mode(grad_loss) is not None or torch._is_functional_tensor(grad_loss):
        return False  # traced (AOT autograd, make_fx): the value is not known
    return bool((grad_loss == 1).all())


def rescaled(grad: torch.Tensor, grad_loss: torch.Tensor, reduction: int) -> torch.Tensor:
    """The precomputed gradient (for an upstream gradient of 1) times the upstream gradient ``grad_loss``
    (a scalar, or ``[N]`` for ``reduction=0``: one factor per row), formed in the accumulation dtype and
    rounded once to the gradient's dtype; ``grad`` itself when the upstream gradient is exactly 1."""
    if _is_exactly_one(grad_loss):
        return grad
    factor = grad_loss.reshape(*grad.shape[:-1], 1) if reduction == _NONE else grad_loss
    out = torch.empty_like(grad)
    return torch.mul(grad, factor, out=out)


def _topk_kl_grad_backward(ctx, grad_loss, _grad_stats, _grad_grad):
    if grad_loss is None:
        return (None,) * 12
    if ctx.precomputed and ctx.saved_tensors:
        (grad,) = ctx.saved_tensors
        grad = rescaled(grad, grad_loss, ctx.options[1])
    elif ctx.precomputed:
        grad, ctx.held = ctx.held, None
        if grad is None:
            raise RuntimeError(
                "topk_kl_loss: the gradient computed in the forward (precompute_grad, the CUDA default) was "
                "handed over by the first backward through this graph; for a second backward (retain_graph=True) "
                "pass precompute_grad=False")
        torch.ops.kdloss.topk_kl_rescale_(grad, grad_loss, ctx.options[1])
    else:
        stats, *tensors = ctx.saved_tensors
        grad = torch.ops.kdloss.topk_kl_bwd(grad_loss, stats, *tensors, *ctx.options)
    (grad,) = first_order_only("topk_kl", grad)
    return (grad,) + (None,) * 11


torch.library.register_autograd("kdloss::topk_kl_fwd_grad", _topk_kl_grad_backward,
                                setup_context=_setup_context_grad)
