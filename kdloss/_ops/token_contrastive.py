"""``kdloss::token_contrastive_*`` ops (TRG global InfoNCE): schemas, fakes, autograd.

Op-level contract (:func:`kdloss.token_contrastive_loss` normalises user input first):

* ``student [M, E]``, ``teacher [M, E]`` — the (already normalised, for cosine similarity) nodes, both in
  the accumulation dtype (fp32; fp64 for fp64), contiguous; both may receive a gradient;
* ``temperature`` τ > 0 as a 0-d float64 CPU tensor (:func:`kdloss._ops.float_arg`);
* ``symmetric`` — also average the column (teacher→student) cross-entropy;
* ``reduction`` — 0 none (``[M]``), 1 mean over M, 2 sum.

With logits ``L = student · teacherᵀ / τ`` the per-node loss is ``lse_row_i − L_ii`` (symmetric: the
mean of that and ``lse_col_i − L_ii``). ``token_contrastive_fwd`` returns ``(loss, lse)``: the loss in
the accumulation dtype (the public function rounds it to the input dtype outside autocast) and
``lse [2, M]`` — the row log-sum-exps of ``L`` and (symmetric only; zeros otherwise) its column
log-sum-exps: the O(M) state the backward needs. On the CPU it is ``[4, M]`` and float64 whatever the
input dtype: rows 2 and 3 hold each row's and column's off-diagonal mass ``1 − p_ii = Σ_{j≠i} p_ij``
(the forward sets the diagonal aside, so a confident row's ``p_ii − 1`` in the gradient does not cancel
to ``eps/(1 − p_ii)``), and a log-sum-exp of logits ~|L| rounded to fp32 errs by ``eps·|L|``, which
every probability ``exp(L_ij − lse_i)`` of the backward would inherit as a relative error (the backward
splits the float64 value into an fp32 pair, so its exps stay fp32). The kernels stream ``L`` in column strips with an
online log-sum-exp and never hold an ``M × M`` matrix.

``token_contrastive_bwd`` recomputes ``L`` strip by strip, forms the gradient of the logits
``G = (w ⊙ softmax_row(L) [+ softmax_col(L) ⊙ w] − diag(w)) / τ`` (``w`` the per-node upstream weights,
halved when symmetric) one strip at a time and returns ``(G · teacher, Gᵀ · student)``; the second is
zeros when ``need_teacher`` is false (and the first when ``need_student`` is false). Every output row is
summed in a fixed order (no atomics): deterministic on both backends.
"""

import torch

from . import LIB, first_order_only

LIB.define(
    "token_contrastive_fwd(Tensor student, Tensor teacher, Tensor temperature, bool symmetric, int reduction) "
    "-> (Tensor, Tensor)"
)
LIB.define(
    "token_contrastive_bwd(Tensor grad, Tensor student, Tensor teacher, Tensor lse, Tensor temperature, "
    "bool symmetric, int reduction, bool need_student, bool need_teacher) -> (Tensor, Tensor)"
)


@torch.library.register_fake("kdloss::token_contrastive_fwd")
def _fwd_fake(student, teacher, temperature, symmetric, reduction):
    m = student.shape[0]
    loss = student.new_empty((m,) if reduction == 0 else ())
    if student.device.type == "cpu":
        return loss, student.new_empty((4, m), dtype=torch.float64)
    return loss, student.new_empty((2, m))


@torch.library.register_fake("kdloss::token_contrastive_bwd")
def _bwd_fake(grad, student, teacher, lse, temperature, symmetric, reduction, need_student, need_teacher):
    return student.new_empty(student.shape), teacher.new_empty(teacher.shape)


def _setup_context(ctx, inputs, output):
    student, teacher, temperature, symmetric, reduction = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(student, teacher, lse, temperature)
    ctx.symmetric, ctx.reduction = symmetric, reduction


def _backward(ctx, grad, _grad_lse):
    student, teacher, lse, temperature = ctx.saved_tensors
    need_student, need_teacher = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_student, grad_teacher = torch.ops.kdloss.token_contrastive_bwd(
        grad, student, teacher, lse, temperature, ctx.symmetric, ctx.reduction, need_student, need_teacher
    )
    grad_student, grad_teacher = first_order_only(
        "token_contrastive", grad_student if need_student else None, grad_teacher if need_teacher else None
    )
    return grad_student, grad_teacher, None, None, None


torch.library.register_autograd("kdloss::token_contrastive_fwd", _backward, setup_context=_setup_context)
