"""``kdloss::token_contextual_*`` ops (TRG contextual loss): schemas, fakes, autograd.

Op-level contract (:func:`kdloss.trg.token_contextual_loss` normalises user input first):

* ``student [B, N, Ds]`` — any float dtype, contiguous;
* ``teacher [B, N, Dt]`` — any float dtype, detached (a constant), contiguous;
* ``reduction`` — 0 none (``[B, N]`` row means), 1 mean over B·N·N, 2 sum.

The forward returns the loss in the accumulation dtype (the public function rounds it to the
student's dtype outside autocast) and the O(B·N) state the backward needs, so that it never stores a
``[B, N, N]`` tensor, all in the accumulation dtype (fp32, fp64 for fp64 students):

* ``stats_student``, ``stats_teacher`` ``[2, B, N]``: per row of the scaled similarities, the max
  ``m`` and ``l = log Σ_j exp(s_j − m)``, so that ``softmax_j = exp((s_j − m) − l)``. They are kept
  apart because rounding ``m + l`` costs up to ``ulp(m)`` relative error on every probability;
* ``rho`` ``[B, N]``: ``ρ_i = Σ_j (A_ij − P_ij) A_ij``.
"""

import torch

from . import LIB, first_order_only

LIB.define(
    "token_contextual_fwd(Tensor student, Tensor teacher, int reduction) -> (Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    "token_contextual_bwd(Tensor grad, Tensor student, Tensor teacher, Tensor stats_student, "
    "Tensor stats_teacher, Tensor rho, int reduction) -> Tensor"
)


@torch.library.register_fake("kdloss::token_contextual_fwd")
def _fwd_fake(student, teacher, reduction):
    batch, n = student.shape[0], student.shape[1]
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty((batch, n) if reduction == 0 else (), dtype=acc)
    stats = [student.new_empty((2, batch, n), dtype=acc) for _ in range(2)]
    return loss, *stats, student.new_empty((batch, n), dtype=acc)


@torch.library.register_fake("kdloss::token_contextual_bwd")
def _bwd_fake(grad, student, teacher, stats_student, stats_teacher, rho, reduction):
    return student.new_empty(student.shape)


def _setup_context(ctx, inputs, output):
    student, teacher, reduction = inputs
    _, stats_s, stats_t, rho = output
    ctx.save_for_backward(student, teacher, stats_s, stats_t, rho)
    ctx.reduction = reduction
    ctx.mark_non_differentiable(stats_s, stats_t, rho)


def _backward(ctx, grad, _grad_stats_s, _grad_stats_t, _grad_rho):
    student, teacher, stats_s, stats_t, rho = ctx.saved_tensors
    grad_student = torch.ops.kdloss.token_contextual_bwd(grad, student, teacher, stats_s, stats_t, rho, ctx.reduction)
    (grad_student,) = first_order_only("token_contextual", grad_student)
    return grad_student, None, None


torch.library.register_autograd("kdloss::token_contextual_fwd", _backward, setup_context=_setup_context)
