"""SinKD reference: batch-wise Sinkhorn distillation in the log domain.

``s_i = softmax(z_s[i]/T)``, ``t_j = softmax(z_t[j]/T)``, ``W_ij = ||s_i − t_j||_1``,
``x⁰ = −W/ε``; ``n_iters`` times: ``x ← x − lse_row(x)`` then ``x ← x − lse_col(x)``;
``L = scale · Σ_ij exp(x_ij) · W_ij``. Identical in exact arithmetic to the official multiplicative
recursion ``P ← P/rowsum(P); P ← P/colsum(P)`` starting from ``K = exp(−W/ε)``, but never 0/0.
Gradients come from autograd through every iteration (through the cost and through the plan).
"""

from __future__ import annotations

import torch

from .._autocast import cast_loss
from .._validation import accumulation_dtype
from ..sinkhorn import SinkhornOptions

__all__ = ["sinkhorn_cost", "sinkhorn_log_plan", "sinkhorn_multiplicative", "sinkhorn_reference"]


def tempered_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / T)`` along the last dim, shifted by the row maximum *before* the division
    (``logits / T`` itself overflows for a tiny T; the limit is one-hot)."""
    top = logits.detach().amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return torch.softmax((logits - top) / temperature, dim=-1)


def sinkhorn_cost(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """``W[B, B']`` with ``W_ij = Σ_c |s_ic − t_jc|`` (the official ``torch.cdist(p_s, p_t, p=1)``)."""
    return torch.cdist(student_probs, teacher_probs, p=1)


def sinkhorn_log_plan(cost: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    """``log P`` after ``n_iters`` row-then-column normalisations of ``exp(−cost/ε)`` (log domain)."""
    x = -cost / epsilon
    for _ in range(n_iters):
        x = x - torch.logsumexp(x, dim=1, keepdim=True)
        x = x - torch.logsumexp(x, dim=0, keepdim=True)
    return x


def sinkhorn_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    options: SinkhornOptions | None = None,
    **option_kwargs,
) -> torch.Tensor:
    """SinKD loss. ``student_logits [B, C]``, ``teacher_logits [B', C]`` (a constant); returns a
    scalar in the student's dtype (fp32 under autocast), computed in fp32 (fp64 for fp64 students). ``B = 0`` or
    ``B' = 0`` gives 0 (an empty plan). Options as a :class:`~kdloss.sinkhorn.SinkhornOptions` or its
    keywords (``gather_across_ranks`` is the functional's business: pass the gathered rows)."""
    options = options or SinkhornOptions(**option_kwargs)
    temperature, epsilon, n_iters, scale = options.temperature, options.epsilon, options.n_iters, options.scale
    acc = accumulation_dtype(student_logits.dtype)
    s = tempered_softmax(student_logits.to(acc), temperature)
    t = tempered_softmax(teacher_logits.detach().to(acc), temperature)
    if s.shape[0] == 0 or t.shape[0] == 0:  # an empty plan: 0 with a zero gradient
        return cast_loss(s.sum() * 0, student_logits.dtype)
    cost = sinkhorn_cost(s, t)
    log_plan = sinkhorn_log_plan(cost, epsilon, n_iters)
    return cast_loss(scale * (torch.exp(log_plan) * cost).sum(), student_logits.dtype)


def sinkhorn_multiplicative(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    n_iters: int = 20,
    scale: float = 1.0,
) -> torch.Tensor:
    """The official code's recursion, written out in the inputs' own dtype (no upcast): what eager
    user code computes. Returns NaN where ``exp(−W/ε)`` underflows."""
    s = torch.softmax(student_logits / temperature, dim=1)
    t = torch.softmax(teacher_logits.detach().to(s.dtype) / temperature, dim=1)
    cost = (s[:, None, :] - t[None, :, :]).abs().sum(-1)
    plan = torch.exp(-cost / epsilon)
    for _ in range(n_iters):
        plan = plan / plan.sum(1, keepdim=True)
        plan = plan / plan.sum(0, keepdim=True)
    return scale * (plan * cost).sum()
