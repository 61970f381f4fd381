"""TRG local-structure (kNN graph) loss reference. Experimental: no official code is public; every
choice the paper leaves open is an option (:class:`kdloss.token_graph.TokenGraphOptions`).

The kNN selection is the loss module's :func:`kdloss.token_graph.knn_indices` (shared pre-processing,
tested on its own against brute force), in its pure-PyTorch form: the same definition and tie-break
(distance, then index) as the kernel's, so both pick the same edges except where two distances agree
to rounding.
"""

from __future__ import annotations

import torch

from .._validation import accumulation_dtype
from ..token_graph import TokenGraphOptions, knn_indices
from ._reduce import reduce_terms

__all__ = ["edge_logits", "token_graph_reference"]


def edge_logits(nodes: torch.Tensor, neighbours: torch.Tensor, sigma: float, edge: str) -> torch.Tensor:
    """Per-edge logits ``[M, k]``: the Gaussian kernel ``exp(−‖x_i − x_j‖² / (2σ))`` (``edge="kernel"``,
    LSP style) or its log ``−‖x_i − x_j‖² / (2σ)`` (``edge="log_kernel"``)."""
    diff = nodes.unsqueeze(1) - nodes[neighbours]
    log_kernel = -(diff * diff).sum(-1) / (2.0 * sigma)
    return log_kernel.exp() if edge == "kernel" else log_kernel


def token_graph_reference(
    student_nodes: torch.Tensor,
    teacher_nodes: torch.Tensor,
    *,
    neighbours: torch.Tensor | None = None,
    options: TokenGraphOptions | None = None,
    **option_kwargs,
) -> torch.Tensor:
    """Local-structure loss over a kNN graph (TRG L_local). ``student_nodes [M, Ds]``,
    ``teacher_nodes [M, Dt]``; ``neighbours [M, k]`` overrides the kNN selection. Options as a
    :class:`~kdloss.token_graph.TokenGraphOptions` or its keywords.

    Per node i with neighbours j (the kNN of the ``graph`` side, shared by both): ``p^S_i =
    softmax_j(a^S_ij)``, ``p^T_i = softmax_j(a^T_ij)`` over the edge logits of :func:`edge_logits`;
    ``KL(p^S ‖ p^T)`` (``kl_direction="student_teacher"``) or ``KL(p^T ‖ p^S)``; mean over nodes.
    """
    options = options or TokenGraphOptions(**option_kwargs)
    k, sigma, graph, edge = options.k, options.sigma, options.graph, options.edge
    kl_direction, reduction = options.kl_direction, options.reduction
    acc = accumulation_dtype(student_nodes.dtype)
    xs = student_nodes.to(acc)
    xt = teacher_nodes.detach().to(acc)
    if neighbours is None:
        neighbours = knn_indices(xt if graph == "teacher" else xs, k, backend="reference")
    if xs.shape[0] == 0 or neighbours.shape[1] == 0:  # no node (or no edge): zero loss, zero gradient
        return reduce_terms(xs.sum(-1) * 0, reduction, student_nodes.dtype)
    log_ps = torch.log_softmax(edge_logits(xs, neighbours, sigma, edge), dim=-1)
    log_pt = torch.log_softmax(edge_logits(xt, neighbours, sigma, edge), dim=-1)
    if kl_direction == "student_teacher":
        per_row = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        per_row = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return reduce_terms(per_row, reduction, student_nodes.dtype)
