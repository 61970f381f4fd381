"""TRG local-structure (kNN graph) and global contrastive references (spec §5.1–5.3). Experimental:
no official code is public; every choice marked ASSUMPTION in the spec is a parameter here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import accumulation_dtype
from ._reduce import reduce_terms


@torch.no_grad()
def knn_indices(nodes: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[M, k]`` of the k nearest other nodes (squared Euclidean distance; self excluded).

    Computed without gradient with one GEMM (``torch.cdist``) and ``topk``; ties go to whatever
    ``topk`` returns (spec §5.4: kNN selection is tie-sensitive and non-differentiable).
    """
    m = nodes.shape[0]
    if m == 0 or k == 0:
        return torch.empty(m, k, dtype=torch.long, device=nodes.device)
    x = nodes.detach().to(accumulation_dtype(nodes.dtype))
    dist = torch.cdist(x, x).pow(2)
    dist.fill_diagonal_(float("inf"))
    return dist.topk(k, dim=1, largest=False).indices


def edge_logits(nodes: torch.Tensor, neighbours: torch.Tensor, sigma: float, edge: str) -> torch.Tensor:
    """Per-edge logits ``[M, k]``: the Gaussian kernel ``exp(−‖x_i − x_j‖² / (2σ))`` (``edge="kernel"``,
    LSP style) or its log ``−‖x_i − x_j‖² / (2σ)`` (``edge="log_kernel"``)."""
    diff = nodes.unsqueeze(1) - nodes[neighbours]
    log_kernel = -(diff * diff).sum(-1) / (2.0 * sigma)
    return log_kernel.exp() if edge == "kernel" else log_kernel


def token_graph_reference(
    student_nodes: torch.Tensor,
    teacher_nodes: torch.Tensor,
    k: int = 8,
    sigma: float = 1.0,
    *,
    graph: str = "teacher",
    edge: str = "kernel",
    kl_direction: str = "student_teacher",
    reduction: str = "mean",
    neighbours: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local-structure loss over a kNN graph (TRG L_local). ``student_nodes [M, Ds]``,
    ``teacher_nodes [M, Dt]``; ``neighbours [M, k]`` overrides the kNN selection.

    Per node i with neighbours j (the kNN of the ``graph`` side, shared by both): ``p^S_i =
    softmax_j(a^S_ij)``, ``p^T_i = softmax_j(a^T_ij)`` over the edge logits of :func:`edge_logits`;
    ``KL(p^S ‖ p^T)`` (``kl_direction="student_teacher"``) or ``KL(p^T ‖ p^S)``; mean over nodes.
    """
    acc = accumulation_dtype(student_nodes.dtype)
    xs = student_nodes.to(acc)
    xt = teacher_nodes.detach().to(acc)
    if neighbours is None:
        neighbours = knn_indices(xt if graph == "teacher" else xs, k)
    if xs.shape[0] == 0 or neighbours.shape[1] == 0:  # no node (or no edge): zero loss, zero gradient
        return reduce_terms(xs.sum(-1) * 0, reduction, student_nodes.dtype)
    log_ps = torch.log_softmax(edge_logits(xs, neighbours, sigma, edge), dim=-1)
    log_pt = torch.log_softmax(edge_logits(xt, neighbours, sigma, edge), dim=-1)
    if kl_direction == "student_teacher":
        per_row = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        per_row = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return reduce_terms(per_row, reduction, student_nodes.dtype)


def token_contrastive_reference(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    temperature: float = 0.1,
    *,
    similarity: str = "cosine",
    symmetric: bool = False,
    detach_teacher: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE between projected student and teacher nodes (TRG L_global). ``student_emb [M, E]``,
    ``teacher_emb [M, E]``. Logits ``sim(h^S_i, h^T_j) / τ`` (cosine or dot), positive = the same
    node (the diagonal), negatives = the other teacher nodes; cross-entropy, mean over nodes.
    ``symmetric=True`` averages with the teacher→student direction. The teacher receives a gradient
    unless ``detach_teacher`` (its projection head is trainable, spec §5.2)."""
    acc = accumulation_dtype(student_emb.dtype)
    hs = student_emb.to(acc)
    ht = teacher_emb.to(acc)
    if detach_teacher:
        ht = ht.detach()
    m = hs.shape[0]
    if m == 0:
        return reduce_terms(hs.sum(-1), reduction, student_emb.dtype)
    if similarity == "cosine":
        hs, ht = F.normalize(hs, dim=-1), F.normalize(ht, dim=-1)
    logits = hs @ ht.T / temperature
    target = torch.arange(m, device=hs.device)
    per_row = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        per_row = 0.5 * (per_row + F.cross_entropy(logits.T, target, reduction="none"))
    return reduce_terms(per_row, reduction, student_emb.dtype)
