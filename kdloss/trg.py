"""Token-level Relationship Graph distillation (TRG): the composite :class:`TRGLoss` and its helpers.

``TRGLoss = α·L_inner + β·L_local + γ·L_global`` over a ViT's (or a CNN feature map's) tokens:

* ``L_inner`` — :func:`kdloss.token_contextual_loss` on all tokens of each image;
* ``L_local`` — :func:`kdloss.token_graph_loss` on tokens sampled per image (the same indices for both
  models, :func:`sample_tokens`), flattened to ``M = B·n`` graph nodes (experimental);
* ``L_global`` — :func:`kdloss.token_contrastive_loss` on learnable linear projections of the sampled
  tokens (experimental).

Helpers: :func:`feature_map_to_tokens` (CNN feature map → patch tokens), :func:`sample_tokens`,
:func:`temperature_schedule` (TRG anneals the contrastive temperature from high to low). The TRG paper
publishes no code: every choice it leaves open is a keyword argument.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._validation import BACKENDS, check_int, check_option, check_real, check_same_device, check_tensor
from .token_contextual import token_contextual_loss
from .token_contrastive import TokenContrastiveLoss
from .token_graph import TokenGraphLoss

__all__ = ["TRGLoss", "feature_map_to_tokens", "sample_tokens", "temperature_schedule"]

SCHEDULES = ("cosine", "linear", "exponential", "constant")


def feature_map_to_tokens(feature_map: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """CNN feature map ``[B, C, H, W]`` → tokens ``[B, (H/p)·(W/p), C·p·p]`` from non-overlapping
    ``p × p`` patches (``unfold``). ``patch_size`` (the paper does not give it; default 1: one token per
    spatial position) must divide H and W."""
    check_tensor(feature_map, "feature_map", ndim=4)
    check_int(patch_size, "patch_size", low=1)
    _, _, h, w = feature_map.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch_size must divide the feature map's H and W, got patch_size={patch_size} "
                         f"for shape {tuple(feature_map.shape)}")
    patches = torch.nn.functional.unfold(feature_map, kernel_size=patch_size, stride=patch_size)
    return patches.transpose(1, 2)


def sample_tokens(
    student_tokens: torch.Tensor,
    teacher_tokens: torch.Tensor,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples ``num_samples`` tokens per image without replacement, with **the same indices** for
    student ``[B, N, Ds]`` and teacher ``[B, N, Dt]``. Returns the sampled student
    ``[B, n, Ds]`` and teacher ``[B, n, Dt]`` tokens and the indices ``[B, n]``. Gradients flow
    through the gather."""
    check_tensor(student_tokens, "student_tokens", ndim=3)
    check_tensor(teacher_tokens, "teacher_tokens", ndim=3)
    check_same_device(student_tokens=student_tokens, teacher_tokens=teacher_tokens)
    if teacher_tokens.shape[:2] != student_tokens.shape[:2]:
        raise ValueError(f"teacher_tokens must share B and N with student_tokens {tuple(student_tokens.shape[:2])}, "
                         f"got shape {tuple(teacher_tokens.shape)}")
    batch, n, _ = student_tokens.shape
    check_int(num_samples, "num_samples", low=0)
    if num_samples > n:
        raise ValueError(f"num_samples must be at most N = {n}, got {num_samples}")
    noise = torch.rand(batch, n, generator=generator, device="cpu" if generator is None else generator.device)
    index = noise.argsort(dim=1)[:, :num_samples].to(student_tokens.device)

    def gather(x):
        return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    return gather(student_tokens), gather(teacher_tokens), index


def temperature_schedule(step: int, total_steps: int, *, start: float = 1.0, end: float = 0.07,
                         kind: str = "cosine") -> float:
    """Dynamic InfoNCE temperature, high → low (coarse → fine structure; TRG's τ_g).
    ``kind``: ``"cosine"`` (default), ``"linear"``, ``"exponential"`` (geometric) or ``"constant"``
    (always ``start``). Steps past ``total_steps`` stay at ``end``. The paper gives no values: these
    defaults are kdloss's choice.

    Example:
        >>> round(temperature_schedule(5, 10), 3)  # halfway through a cosine schedule from 1.0 to 0.07
        0.535
    """
    check_int(step, "step", low=0)
    check_int(total_steps, "total_steps", low=1)
    check_real(start, "start", low=0.0)
    check_real(end, "end", low=0.0)
    check_option(kind, "kind", SCHEDULES)
    frac = min(step, total_steps) / total_steps
    if kind == "constant":
        return float(start)
    if kind == "linear":
        return float(start + (end - start) * frac)
    if kind == "exponential":
        return float(start * (end / start) ** frac)
    return float(end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * frac)))


class TRGLoss(nn.Module):
    """Token-level Relationship Graph distillation: ``α·L_inner + β·L_local + γ·L_global``.
    **The graph and contrastive terms are experimental**.

    ``forward(student_tokens [B, N, Ds], teacher_tokens [B, N, Dt])``:

    * ``L_inner`` = :func:`token_contextual_loss` on all tokens of each image;
    * ``num_samples`` tokens per image are sampled with the same indices for both models
      (:func:`sample_tokens`; ``None`` keeps all) and flattened to ``M = B·n`` graph nodes;
    * ``L_local`` = :func:`token_graph_loss` on the raw sampled tokens;
    * ``L_global`` = :func:`token_contrastive_loss` on learnable linear projections of the sampled
      tokens to width ``embed_dim`` (``student_proj``, ``teacher_proj``; the teacher projection is
      trained unless ``detach_teacher``).

    Args:
        student_dim, teacher_dim: token widths Ds and Dt (for the projections).
        alpha, beta, gamma: term weights (default 1.0 each; the paper gives no values). A zero weight skips its term.
        embed_dim: projection width E (default 256; the paper gives none).
        num_samples: tokens sampled per image for the graph terms (default 64; the paper gives none).
        k, sigma, graph, edge, kl_direction: as in :func:`token_graph_loss`.
        temperature, similarity, symmetric, detach_teacher: as in :func:`token_contrastive_loss`;
            update ``self.temperature`` from :func:`temperature_schedule` during training.
        gather_across_ranks, group: as in :func:`token_contrastive_loss`, for the contrastive term only
            (negatives from every rank of ``group``); the other terms are per image.
        backend: passed to the contextual, graph and contrastive terms.

    The logit-KD and cross-entropy terms of the paper's total are left to the caller. With
    ``return_terms=True``, ``forward`` returns ``(total, {"inner": …, "local": …, "global": …})``.

    Shape:
        ``forward(student_tokens [B, N, Ds], teacher_tokens [B, N, Dt])`` → a scalar.

    Example:
        >>> loss_fn = TRGLoss(32, 64, embed_dim=16, num_samples=8, k=4, sigma=64.0)
        >>> loss_fn(torch.randn(2, 16, 32, requires_grad=True), torch.randn(2, 16, 64)).backward()

    The projection heads are parameters of this module: put them in the optimizer (and, under DDP,
    inside the wrapped model) together with the student's.
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, alpha: float = 1.0, beta: float = 1.0,
                 gamma: float = 1.0, embed_dim: int = 256, num_samples: int | None = 64, k: int = 8,
                 sigma: float = 1.0, graph: str = "teacher", edge: str = "kernel",
                 kl_direction: str = "student_teacher", temperature: float = 0.1, similarity: str = "cosine",
                 symmetric: bool = False, detach_teacher: bool = False, gather_across_ranks: bool = False,
                 group=None, backend: str = "auto") -> None:
        super().__init__()
        check_int(student_dim, "student_dim", low=1)
        check_int(teacher_dim, "teacher_dim", low=1)
        check_int(embed_dim, "embed_dim", low=1)
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            check_real(value, name, low=0.0, low_open=False)
        if num_samples is not None:
            check_int(num_samples, "num_samples", low=1)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.num_samples = num_samples
        self.graph_loss = TokenGraphLoss(k=k, sigma=sigma, graph=graph, edge=edge, kl_direction=kl_direction,
                                         backend=backend)
        self.contrastive_loss = TokenContrastiveLoss(temperature=temperature, similarity=similarity,
                                                     symmetric=symmetric, detach_teacher=detach_teacher,
                                                     gather_across_ranks=gather_across_ranks, group=group,
                                                     backend=backend)
        self.backend = check_option(backend, "backend", BACKENDS)
        self.student_proj = nn.Linear(student_dim, embed_dim)
        self.teacher_proj = nn.Linear(teacher_dim, embed_dim)

    @property
    def temperature(self) -> float:
        return self.contrastive_loss.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.contrastive_loss.temperature = value

    def forward(self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, *,
                generator: torch.Generator | None = None, return_terms: bool = False):
        check_tensor(student_tokens, "student_tokens", ndim=3)
        check_tensor(teacher_tokens, "teacher_tokens", ndim=3)
        if student_tokens.shape[-1] != self.student_proj.in_features:
            raise ValueError(f"student_tokens must have width {self.student_proj.in_features} (student_dim), "
                             f"got shape {tuple(student_tokens.shape)}")
        if teacher_tokens.shape[-1] != self.teacher_proj.in_features:
            raise ValueError(f"teacher_tokens must have width {self.teacher_proj.in_features} (teacher_dim), "
                             f"got shape {tuple(teacher_tokens.shape)}")
        zero = student_tokens.new_zeros(())
        terms = {"inner": zero, "local": zero, "global": zero}
        if self.alpha:
            terms["inner"] = token_contextual_loss(student_tokens, teacher_tokens, backend=self.backend)
        if self.beta or self.gamma:
            n = student_tokens.shape[1] if self.num_samples is None else min(self.num_samples, student_tokens.shape[1])
            s, t, _ = sample_tokens(student_tokens, teacher_tokens, n, generator=generator)
            s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]).detach()
            if self.beta:
                terms["local"] = self.graph_loss(s, t)
            if self.gamma:
                hs = self.student_proj(s)
                ht = self.teacher_proj(t.to(self.teacher_proj.weight.dtype))
                terms["global"] = self.contrastive_loss(hs, ht.to(hs.dtype))
        total = self.alpha * terms["inner"] + self.beta * terms["local"] + self.gamma * terms["global"]
        return (total, terms) if return_terms else total

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, num_samples={self.num_samples}, "
                f"backend={self.backend!r}")
