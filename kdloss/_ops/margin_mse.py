"""``kdloss::margin_mse_*`` ops: schemas, fakes and autograd.

Op-level contract (the public functions in :mod:`kdloss.margin_mse` normalise user input first):

* ``student_pos [B]``, ``student_neg [B, n]`` — scores, any float dtype (same for both);
* ``query [B, D]``, ``positive [B, D]``, ``negatives [B, n, D]`` — the ``_emb`` variants score
  by dot product inside the kernel;
* ``teacher`` — ``[B, n+1]`` raw scores (positive first) when ``teacher_is_scores`` else ``[B, n]``
  margins, in the accumulation dtype (fp32; fp64 for fp64 students); a constant (no gradient);
* ``reduction`` — 0 none (``[B, n]`` squared errors), 1 mean over the B·n margins, 2 sum.

The forwards return the loss in the accumulation dtype (the public functions round it to the
students' dtype outside autocast); the backwards take an upstream gradient of any float dtype.
"""

import torch

from . import LIB, first_order_only

LIB.define(
    "margin_mse_fwd(Tensor student_pos, Tensor student_neg, Tensor teacher, "
    "bool teacher_is_scores, int reduction) -> Tensor"
)
LIB.define(
    "margin_mse_bwd(Tensor grad, Tensor student_pos, Tensor student_neg, Tensor teacher, "
    "bool teacher_is_scores, int reduction) -> (Tensor, Tensor)"
)
LIB.define(
    "margin_mse_emb_fwd(Tensor query, Tensor positive, Tensor negatives, Tensor teacher, "
    "bool teacher_is_scores, int reduction) -> Tensor"
)
LIB.define(
    "margin_mse_emb_bwd(Tensor grad, Tensor query, Tensor positive, Tensor negatives, "
    "Tensor teacher, bool teacher_is_scores, int reduction) -> (Tensor, Tensor, Tensor)"
)


def _loss_like(student: torch.Tensor, batch: int, n_neg: int, reduction: int) -> torch.Tensor:
    shape = (batch, n_neg) if reduction == 0 else ()
    return student.new_empty(shape, dtype=torch.float64 if student.dtype == torch.float64 else torch.float32)


@torch.library.register_fake("kdloss::margin_mse_fwd")
def _margin_mse_fwd_fake(student_pos, student_neg, teacher, teacher_is_scores, reduction):
    return _loss_like(student_pos, student_neg.shape[0], student_neg.shape[1], reduction)


@torch.library.register_fake("kdloss::margin_mse_bwd")
def _margin_mse_bwd_fake(grad, student_pos, student_neg, teacher, teacher_is_scores, reduction):
    return student_pos.new_empty(student_pos.shape), student_neg.new_empty(student_neg.shape)


@torch.library.register_fake("kdloss::margin_mse_emb_fwd")
def _margin_mse_emb_fwd_fake(query, positive, negatives, teacher, teacher_is_scores, reduction):
    return _loss_like(query, negatives.shape[0], negatives.shape[1], reduction)


@torch.library.register_fake("kdloss::margin_mse_emb_bwd")
def _margin_mse_emb_bwd_fake(grad, query, positive, negatives, teacher, teacher_is_scores, reduction):
    return query.new_empty(query.shape), query.new_empty(positive.shape), query.new_empty(negatives.shape)


def _setup_context(ctx, inputs, output):
    *tensors, teacher_is_scores, reduction = inputs
    ctx.save_for_backward(*tensors)
    ctx.teacher_is_scores = teacher_is_scores
    ctx.reduction = reduction


def _margin_mse_backward(ctx, grad):
    student_pos, student_neg, teacher = ctx.saved_tensors
    grad_pos, grad_neg = torch.ops.kdloss.margin_mse_bwd(
        grad, student_pos, student_neg, teacher, ctx.teacher_is_scores, ctx.reduction
    )
    return (*first_order_only("margin_mse", grad_pos, grad_neg), None, None, None)


def _margin_mse_emb_backward(ctx, grad):
    query, positive, negatives, teacher = ctx.saved_tensors
    grad_q, grad_p, grad_n = torch.ops.kdloss.margin_mse_emb_bwd(
        grad, query, positive, negatives, teacher, ctx.teacher_is_scores, ctx.reduction
    )
    return (*first_order_only("margin_mse", grad_q, grad_p, grad_n), None, None, None)


torch.library.register_autograd(
    "kdloss::margin_mse_fwd", _margin_mse_backward, setup_context=_setup_context
)
torch.library.register_autograd(
    "kdloss::margin_mse_emb_fwd", _margin_mse_emb_backward, setup_context=_setup_context
)
