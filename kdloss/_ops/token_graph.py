"""``kdloss::token_graph_*`` ops (TRG kNN-graph local-structure loss): schemas,
fakes, autograd.

Op-level contract (:func:`kdloss.trg.token_graph_loss` normalises user input and selects the
neighbours first):

* ``student [M, Ds]`` — any float dtype, contiguous; receives the gradient;
* ``teacher [M, Dt]`` — detached, contiguous, in the accumulation dtype (fp32; fp64 for fp64);
* ``neighbours [M, k]`` int64 in ``[0, M)`` (validated in Python; the CPU kernel re-checks, the
  CUDA kernels skip out-of-range edges), contiguous;
* ``sigma`` > 0 as a 0-d float64 CPU tensor (:func:`kdloss._ops.float_arg`);
  ``edge`` 0 kernel ``exp(−d²/2σ)`` / 1 log kernel ``−d²/2σ``; ``direction``
  0 ``KL(p^S‖p^T)`` / 1 ``KL(p^T‖p^S)``; ``reduction`` 0 none (``[M]``) / 1 mean over M / 2 sum.

``token_graph_fwd`` returns ``(loss, coef)``: the loss in the accumulation dtype (the public
function rounds it to the student's dtype outside autocast) and the per-edge
coefficient ``coef[i, j] = ∂L_i/∂d²_ij`` (``[M, k]``, accumulation dtype; not differentiable) —
the O(M·k) state the backward needs. ``token_graph_bwd`` turns it into the gradient
``∂L/∂x_i = Σ_{edges (i,j) or (j,i)} 2·g·coef·(x_i − x_j)`` with ``g`` the upstream gradient
(÷ M for mean); the scatter onto neighbours goes through a transposed (CSR) edge list, so each
output row is written by one task in a fixed order (deterministic on both backends).

``token_graph_knn(nodes [M, D], k)`` (CPU only; float32 or float64 nodes, ``0 ≤ k ≤ M − 1``) returns
the ``[M, k]`` int64 indices of each node's k nearest other nodes, ordered by (squared distance,
index) ascending, from a blocked top-k over GEMM tiles (no ``[M, M]`` matrix); see
:func:`kdloss.token_graph.knn_indices` for the definition.
"""

import torch

from .._validation import accumulation_dtype
from . import LIB, first_order_only

LIB.define(
    "token_graph_fwd(Tensor student, Tensor teacher, Tensor neighbours, Tensor sigma, int edge, int direction, "
    "int reduction) -> (Tensor, Tensor)"
)
LIB.define("token_graph_bwd(Tensor grad, Tensor student, Tensor neighbours, Tensor coef, int reduction) -> Tensor")
LIB.define("token_graph_knn(Tensor nodes, int k) -> Tensor")

#: option codes of the ops
EDGE_CODES = {"kernel": 0, "log_kernel": 1}
DIRECTION_CODES = {"student_teacher": 0, "teacher_student": 1}


@torch.library.register_fake("kdloss::token_graph_fwd")
def _fwd_fake(student, teacher, neighbours, sigma, edge, direction, reduction):
    m = student.shape[0]
    acc = accumulation_dtype(student.dtype)
    loss = student.new_empty((m,) if reduction == 0 else (), dtype=acc)
    return loss, student.new_empty(neighbours.shape, dtype=acc)


@torch.library.register_fake("kdloss::token_graph_bwd")
def _bwd_fake(grad, student, neighbours, coef, reduction):
    return student.new_empty(student.shape)


@torch.library.register_fake("kdloss::token_graph_knn")
def _knn_fake(nodes, k):
    return nodes.new_empty((nodes.shape[0], k), dtype=torch.long)


def _setup_context(ctx, inputs, output):
    student, _teacher, neighbours, _sigma, _edge, _direction, reduction = inputs
    _, coef = output
    ctx.mark_non_differentiable(coef)
    ctx.save_for_backward(student, neighbours, coef)
    ctx.reduction = reduction


def _backward(ctx, grad, _grad_coef):
    student, neighbours, coef = ctx.saved_tensors
    grad_student = torch.ops.kdloss.token_graph_bwd(grad, student, neighbours, coef, ctx.reduction)
    (grad_student,) = first_order_only("token_graph", grad_student)
    return grad_student, None, None, None, None, None, None


torch.library.register_autograd("kdloss::token_graph_fwd", _backward, setup_context=_setup_context)
