"""TRG global contrastive (InfoNCE) loss reference. Experimental: no official code is public; every
choice the paper leaves open is an option (:class:`kdloss.token_contrastive.TokenContrastiveOptions`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._autocast import no_autocast
from .._validation import accumulation_dtype
from ..token_contrastive import TokenContrastiveOptions, normalize_rows
from ._reduce import reduce_terms

__all__ = ["token_contrastive_reference"]


def token_contrastive_reference(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    *,
    options: TokenContrastiveOptions | None = None,
    **option_kwargs,
) -> torch.Tensor:
    """InfoNCE between projected student and teacher nodes (TRG L_global). ``student_emb [M, E]``,
    ``teacher_emb [M, E]``. Logits ``sim(h^S_i, h^T_j) / τ`` (cosine or dot), positive = the same
    node (the diagonal), negatives = the other teacher nodes; cross-entropy, mean over nodes.
    ``symmetric=True`` averages with the teacher→student direction. The teacher receives a gradient
    unless ``detach_teacher`` (TRG trains its projection head). Options as a
    :class:`~kdloss.token_contrastive.TokenContrastiveOptions` or its keywords. ``gather_across_ranks`` is
    applied by :func:`kdloss.token_contrastive_loss` before it calls this (the inputs here are the nodes
    already gathered)."""
    options = options or TokenContrastiveOptions(**option_kwargs)
    temperature, similarity, symmetric = options.temperature, options.similarity, options.symmetric
    detach_teacher, reduction = options.detach_teacher, options.reduction
    acc = accumulation_dtype(student_emb.dtype)
    hs = student_emb.to(acc)
    ht = teacher_emb.to(acc)
    if detach_teacher:
        ht = ht.detach()
    m = hs.shape[0]
    if m == 0:
        return reduce_terms(hs.sum(-1), reduction, student_emb.dtype)
    if similarity == "cosine":  # F.normalize's values; its gradient in projection form (exact for E = 1)
        hs, ht = normalize_rows(hs), normalize_rows(ht)
    with no_autocast(hs.device.type):  # the similarity GEMM stays in the accumulation dtype
        logits = hs @ ht.T / temperature
    target = torch.arange(m, device=hs.device)
    per_row = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        per_row = 0.5 * (per_row + F.cross_entropy(logits.T, target, reduction="none"))
    return reduce_terms(per_row, reduction, student_emb.dtype)
