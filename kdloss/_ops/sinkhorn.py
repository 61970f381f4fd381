"""``kdloss::sinkhorn_*`` ops (SinKD): schemas, fakes and autograd.

Op-level contract (the public function in :mod:`kdloss.sinkhorn` validates and normalises first):

* ``student_logits [B, C]`` — any float dtype; ``teacher_logits [B', C]`` — detached, in the
  accumulation dtype (fp32; fp64 for fp64 students); ``C ≥ 1``; ``B`` or ``B'`` may be 0 (loss 0);
* ``temperature > 0``, ``epsilon > 0``, ``scale`` finite: 0-d float64 CPU tensors
  (:func:`kdloss._ops.float_arg`); ``n_iters ≥ 1``.

``sinkhorn_fwd`` returns the loss (a scalar in the accumulation dtype; the public function rounds
it to the student's dtype outside autocast) and, for the backward, the softmax probabilities
``[B, C]`` / ``[B', C]`` and the cost matrix ``W [B, B']`` (accumulation dtype on CUDA, float64 on
the CPU), then two tensors of device-specific backward state:

* CPU: ``steps`` is empty and ``state [2·n_iters, 1 + 2(B + B')]`` (float64) holds, per half-step,
  the stabilised iterations' epoch, potentials ``F [B]``, ``G [B']`` and scalings ``u [B]``,
  ``v [B']`` (the plan is ``diag(u)·exp(F_i + G_j − W_ij/ε)·diag(v)``); where ε·min(T, 1) < 0.1 the
  log-domain recursion runs instead, and the first ``n·(B + B')`` entries hold its increments.
  There the CPU kernel computes the softmaxes, the cost and the recursion (forward and
  backward) in float64 for every input dtype (the fp32 rounding of ``W``, a difference of nearly
  equal probabilities, would be amplified by 1/ε); elsewhere, in the accumulation dtype, whose values
  the float64 probabilities and cost then hold exactly. The dtypes never depend on ε or T.
* CUDA: ``steps [n_iters, B + B']`` (accumulation dtype) holds the log-domain increments ``a [n, B]``
  (subtracted from the rows by each row step) followed by ``b [n, B']`` (from the columns), and
  ``state`` is empty; the backward replays the subtractions (from a few checkpoints) to regenerate
  the forward's iterates bitwise.

``sinkhorn_bwd`` runs the adjoint (reverse-mode) recursion of the iterations from that state and
returns ``∂L/∂student_logits``.
"""

import torch

from .._validation import accumulation_dtype
from . import LIB, first_order_only

LIB.define(
    "sinkhorn_fwd(Tensor student_logits, Tensor teacher_logits, Tensor temperature, Tensor epsilon, "
    "int n_iters, Tensor scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    "sinkhorn_bwd(Tensor grad, Tensor student_logits, Tensor student_probs, Tensor teacher_probs, "
    "Tensor cost, Tensor steps, Tensor potentials, Tensor temperature, Tensor epsilon, Tensor scale) -> Tensor"
)


@torch.library.register_fake("kdloss::sinkhorn_fwd")
def _sinkhorn_fwd_fake(student_logits, teacher_logits, temperature, epsilon, n_iters, scale):
    batch, classes = student_logits.shape
    batch_t = teacher_logits.shape[0]
    acc = accumulation_dtype(student_logits.dtype)
    saved = acc if student_logits.device.type == "cuda" else torch.float64
    return (
        student_logits.new_empty((), dtype=acc),
        student_logits.new_empty((batch, classes), dtype=saved),
        student_logits.new_empty((batch_t, classes), dtype=saved),
        student_logits.new_empty((batch, batch_t), dtype=saved),
        *_state_fakes(student_logits, batch, batch_t, n_iters, acc),
    )


def _state_fakes(student_logits, batch, batch_t, n_iters, acc):
    """The backward state: on CUDA the log-domain increments ``[n_iters, B + B']`` (accumulation
    dtype) and an empty float64 tensor; on the CPU an empty tensor and the stabilised iterations'
    history ``[2·n_iters, 1 + 2(B + B')]`` (float64)."""
    if student_logits.device.type == "cuda":
        return (student_logits.new_empty((n_iters, batch + batch_t), dtype=acc),
                student_logits.new_empty((0,), dtype=torch.float64))
    return (student_logits.new_empty((0,), dtype=acc),
            student_logits.new_empty((2 * n_iters, 1 + 2 * (batch + batch_t)), dtype=torch.float64))


@torch.library.register_fake("kdloss::sinkhorn_bwd")
def _sinkhorn_bwd_fake(grad, student_logits, student_probs, teacher_probs, cost, steps, state, temperature,
                       epsilon, scale):
    return student_logits.new_empty(student_logits.shape)


def _setup_context(ctx, inputs, output):
    student_logits, _teacher, temperature, epsilon, _n_iters, scale = inputs
    _loss, probs_s, probs_t, cost, steps, state = output
    ctx.mark_non_differentiable(probs_s, probs_t, cost, steps, state)
    ctx.save_for_backward(student_logits, probs_s, probs_t, cost, steps, state, temperature, epsilon, scale)


def _sinkhorn_backward(ctx, grad, *_unused):
    grad_student = torch.ops.kdloss.sinkhorn_bwd(grad, *ctx.saved_tensors)
    (grad_student,) = first_order_only("sinkhorn", grad_student)
    return grad_student, None, None, None, None, None


torch.library.register_autograd("kdloss::sinkhorn_fwd", _sinkhorn_backward, setup_context=_setup_context)
