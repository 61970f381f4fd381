"""``kdloss::token_contextual_*`` ops (TRG contextual loss, spec §5.2–5.3): schemas, fakes, autograd.

Op-level contract (:func:`kdloss.trg.token_contextual_loss` normalises user input first):

* ``student [B, N, Ds]`` — any float dtype, contiguous;
* ``teacher [B, N, Dt]`` — any float dtype, detached (a constant), contiguous;
* ``reduction`` — 0 none (``[B, N]`` row means), 1 mean over B·N·N, 2 sum.

The forward also returns, per row, the log-sum-exps of the scaled similarities of the student and
of the teacher and ``ρ_i = Σ_j (A_ij − P_ij) A_ij`` (each ``[B, N]`` in the accumulation dtype:
fp32, fp64 for fp64 students): the O(B·N) state the backward needs, so it never stores a
``[B, N, N]`` tensor.
"""

import torch

from . import LIB

LIB.define(
    "token_contextual_fwd(Tensor student, Tensor teacher, int reduction) -> (Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    "token_contextual_bwd(Tensor grad, Tensor student, Tensor teacher, Tensor lse_student, "
    "Tensor lse_teacher, Tensor rho, int reduction) -> Tensor"
)


@torch.library.register_fake("kdloss::token_contextual_fwd")
def _fwd_fake(student, teacher, reduction):
    batch, n = student.shape[0], student.shape[1]
    loss = student.new_empty((batch, n) if reduction == 0 else ())
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    return loss, *(student.new_empty((batch, n), dtype=acc) for _ in range(3))


@torch.library.register_fake("kdloss::token_contextual_bwd")
def _bwd_fake(grad, student, teacher, lse_student, lse_teacher, rho, reduction):
    return student.new_empty(student.shape)


def _setup_context(ctx, inputs, output):
    student, teacher, reduction = inputs
    _, lse_s, lse_t, rho = output
    ctx.save_for_backward(student, teacher, lse_s, lse_t, rho)
    ctx.reduction = reduction
    ctx.mark_non_differentiable(lse_s, lse_t, rho)


def _backward(ctx, grad, _grad_lse_s, _grad_lse_t, _grad_rho):
    student, teacher, lse_s, lse_t, rho = ctx.saved_tensors
    grad_student = torch.ops.kdloss.token_contextual_bwd(grad, student, teacher, lse_s, lse_t, rho, ctx.reduction)
    return grad_student, None, None


torch.library.register_autograd("kdloss::token_contextual_fwd", _backward, setup_context=_setup_context)
