"""``kdloss::token_contextual_*`` ops (TRG contextual loss): schemas, fakes, autograd.

Op-level contract (:func:`kdloss.trg.token_contextual_loss` normalises user input first):

* ``student [B, N, Ds]`` — any float dtype, contiguous;
* ``teacher [B, N, Dt]`` — any float dtype, detached (a constant), contiguous;
* ``reduction`` — 0 none (``[B, N]`` row means), 1 mean over B·N·N, 2 sum;
* ``with_grad`` — the student needs a gradient (the public function passes
  ``torch.is_grad_enabled() and student.requires_grad``).

The forward returns the loss in the accumulation dtype (the public function rounds it to the
student's dtype outside autocast) and the O(B·N) state the backward needs, so that it never stores a
``[B, N, N]`` tensor, all in the accumulation dtype (fp32, fp64 for fp64 students):

* ``stats_student``, ``stats_teacher`` ``[2, B, N]``: per row of the scaled similarities, the max
  ``m`` and ``l = log Σ_j exp(s_j − m)``, so that ``softmax_j = exp((s_j − m) − l)``. They are kept
  apart because rounding ``m + l`` costs up to ``ulp(m)`` relative error on every probability;
* ``rho`` ``[B, N]``: ``ρ_i = Σ_j (A_ij − P_ij) A_ij``;
* ``grad_unit``: with ``with_grad`` and a scalar reduction (mean or sum), the gradient for an
  upstream gradient of 1, ``[B, N, Ds]`` in the accumulation dtype, computed in the forward (the
  backward scales it and rounds once to the student's dtype: no recomputation; for an upstream
  gradient of exactly 1 on CPU, outside tracing, it skips the product); otherwise an empty
  ``[0]`` tensor and the backward recomputes the similarities from the O(B·N) statistics.
"""

import torch

from . import LIB, first_order_only
from .topk_kl import rescaled

LIB.define(
    "token_contextual_fwd(Tensor student, Tensor teacher, int reduction, bool with_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    "token_contextual_bwd(Tensor grad, Tensor student, Tensor teacher, Tensor stats_student, "
    "Tensor stats_teacher, Tensor rho, int reduction) -> Tensor"
)


@torch.library.register_fake("kdloss::token_contextual_fwd")
def _fwd_fake(student, teacher, reduction, with_grad):
    batch, n = student.shape[0], student.shape[1]
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty((batch, n) if reduction == 0 else (), dtype=acc)
    stats = [student.new_empty((2, batch, n), dtype=acc) for _ in range(2)]
    grad_unit = student.new_empty(student.shape if _precomputed(reduction, with_grad) else (0,), dtype=acc)
    return loss, *stats, student.new_empty((batch, n), dtype=acc), grad_unit


def _precomputed(reduction: int, with_grad: bool) -> bool:
    return with_grad and reduction != 0


@torch.library.register_fake("kdloss::token_contextual_bwd")
def _bwd_fake(grad, student, teacher, stats_student, stats_teacher, rho, reduction):
    return student.new_empty(student.shape)


def _setup_context(ctx, inputs, output):
    student, teacher, reduction, with_grad = inputs
    _, stats_s, stats_t, rho, grad_unit = output
    ctx.mark_non_differentiable(stats_s, stats_t, rho, grad_unit)
    ctx.set_materialize_grads(False)  # no [B, N, Ds] zeros for grad_unit's own (unused) gradient
    ctx.precomputed = _precomputed(reduction, with_grad)
    ctx.reduction = reduction
    ctx.student_dtype = student.dtype
    if ctx.precomputed:
        ctx.save_for_backward(grad_unit)
    else:
        ctx.save_for_backward(student, teacher, stats_s, stats_t, rho)


def _backward(ctx, grad, *_unused):
    if grad is None:
        return None, None, None, None
    with torch.no_grad():
        if ctx.precomputed:
            (grad_unit,) = ctx.saved_tensors
            # out of place (retain_graph may run the backward again; an upstream gradient of exactly 1
            # on CPU skips the product); scaled in the accumulation dtype, rounded once to the
            # student's dtype
            grad_student = rescaled(grad_unit, grad, ctx.reduction).to(ctx.student_dtype)
        else:
            student, teacher, stats_s, stats_t, rho = ctx.saved_tensors
            grad_student = torch.ops.kdloss.token_contextual_bwd(grad, student, teacher, stats_s, stats_t, rho,
                                                                 ctx.reduction)
    (grad_student,) = first_order_only("token_contextual", grad_student)
    return grad_student, None, None, None


torch.library.register_autograd("kdloss::token_contextual_fwd", _backward, setup_context=_setup_context)
