"""``kdloss::plackett_luce_*`` ops: schemas, fakes and autograd.

Op-level contract (the public function in :mod:`kdloss.plackett_luce` normalises user input first):

* ``student [R, C]`` — logits, any float dtype, last dimension unit-stride;
* ``teacher [R, C]`` — logits in the accumulation dtype (fp32; fp64 for fp64 students), a constant;
* ``labels [R]`` int64 — class indices, or ``ignore_index`` for rows that do not count;
* ``teacher_permutation`` — ``None`` (the kernel sorts) or ``[R, C]`` int64, each row the teacher's
  ranking of all C classes (the label is moved to the front by the kernel);
* ``temperature`` — τ as a 0-d float64 CPU tensor (:func:`kdloss._ops.float_arg`);
* ``reduction`` — 0 none (``[R]``), 1 mean over counted rows, 2 sum.

The forward returns the loss in the accumulation dtype (the public function rounds it to the
student's dtype outside autocast) and ``order [R, C]`` int32, the permutation π* it used (label first), so the
backward needs no second sort. Ignored rows hold the identity there.
"""

import torch

from . import LIB, first_order_only

LIB.define(
    "plackett_luce_fwd(Tensor student, Tensor teacher, Tensor labels, Tensor? teacher_permutation, "
    "Tensor temperature, int ignore_index, int reduction) -> (Tensor, Tensor)"
)
LIB.define(
    "plackett_luce_bwd(Tensor grad, Tensor student, Tensor teacher, Tensor labels, Tensor order, "
    "Tensor temperature, int ignore_index, int reduction) -> Tensor"
)


@torch.library.register_fake("kdloss::plackett_luce_fwd")
def _plackett_luce_fwd_fake(student, teacher, labels, teacher_permutation, temperature, ignore_index, reduction):
    rows, classes = student.shape
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty((rows,) if reduction == 0 else (), dtype=acc)
    order = student.new_empty((rows, classes), dtype=torch.int32)
    return loss, order


@torch.library.register_fake("kdloss::plackett_luce_bwd")
def _plackett_luce_bwd_fake(grad, student, teacher, labels, order, temperature, ignore_index, reduction):
    return student.new_empty(student.shape)


def _setup_context(ctx, inputs, output):
    student, teacher, labels, _perm, temperature, ignore_index, reduction = inputs
    _loss, order = output
    ctx.mark_non_differentiable(order)
    ctx.save_for_backward(student, teacher, labels, order, temperature)
    ctx.ignore_index = ignore_index
    ctx.reduction = reduction


def _plackett_luce_backward(ctx, grad, _grad_order):
    student, teacher, labels, order, temperature = ctx.saved_tensors
    grad_student = torch.ops.kdloss.plackett_luce_bwd(
        grad, student, teacher, labels, order, temperature, ctx.ignore_index, ctx.reduction
    )
    (grad_student,) = first_order_only("plackett_luce", grad_student)
    return grad_student, None, None, None, None, None, None


torch.library.register_autograd(
    "kdloss::plackett_luce_fwd", _plackett_luce_backward, setup_context=_setup_context
)
