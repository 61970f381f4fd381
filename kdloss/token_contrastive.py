"""Global-topology InfoNCE (TRG's ``L_global``): :func:`token_contrastive_loss` and
:class:`TokenContrastiveLoss`. **Experimental.**

Logits ``sim(h^S_i, h^T_j) / τ`` over all node pairs of the projected student and teacher nodes; the
positive of student node i is teacher node i, the negatives are the other teacher nodes; cross-entropy
(log-softmax form), mean over nodes. TRG anneals τ from high to low (coarse to fine structure): see
:func:`kdloss.trg.temperature_schedule`. The CPU and CUDA kernels stream the ``M × M`` logits in column
strips with an online log-sum-exp and never hold them (O(M·E) extra memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops
from ._autocast import cast_loss
from ._collectives import gather_rows, group_rank_world
from ._dispatch import use_kernel
from ._options import OptionsModule
from ._validation import (
    REDUCTIONS,
    accumulation_dtype,
    check_bool,
    check_option,
    check_same_device,
    check_scale,
    check_tensor,
)

__all__ = ["TokenContrastiveLoss", "TokenContrastiveOptions", "token_contrastive_loss"]

SIMILARITIES = ("cosine", "dot")


@dataclass(frozen=True)
class TokenContrastiveOptions:
    """Options of :func:`token_contrastive_loss`.

    Args:
        temperature: τ > 0 (default 0.1).
        similarity: ``"cosine"`` (default) or ``"dot"``.
        symmetric: also average the teacher→student direction (default False: teacher-side negatives only).
        detach_teacher: stop the gradient into ``teacher_emb`` (default False: TRG trains the teacher-side
            projection head).
        reduction: ``"mean"`` over nodes (default), ``"sum"`` or ``"none"`` (``[M]``).
        gather_across_ranks: under an initialised ``torch.distributed`` process group, use every rank's
            nodes as one global set of nodes (negatives from all ranks; default False).
    """

    temperature: float = 0.1
    similarity: str = "cosine"
    symmetric: bool = False
    detach_teacher: bool = False
    reduction: str = "mean"
    gather_across_ranks: bool = False

    def __post_init__(self) -> None:
        check_scale(self.temperature, "temperature")
        check_option(self.similarity, "similarity", SIMILARITIES)
        check_bool(self.symmetric, "symmetric")
        check_bool(self.detach_teacher, "detach_teacher")
        check_option(self.reduction, "reduction", REDUCTIONS)
        check_bool(self.gather_across_ranks, "gather_across_ranks")


_D = TokenContrastiveOptions


def token_contrastive_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    *,
    temperature: float = _D.temperature,
    similarity: str = _D.similarity,
    symmetric: bool = _D.symmetric,
    detach_teacher: bool = _D.detach_teacher,
    reduction: str = _D.reduction,
    gather_across_ranks: bool = _D.gather_across_ranks,
    group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Global-topology InfoNCE (TRG ``L_global``). **Experimental.**

    Args:
        student_emb: ``[M, E]`` projected student nodes.
        teacher_emb: ``[M, E]`` projected teacher nodes. Unlike other losses' teachers it receives a
            gradient by default (TRG trains the teacher-side projection head).
        temperature, similarity, symmetric, detach_teacher, reduction: see :class:`TokenContrastiveOptions`.
        gather_across_ranks: under an initialised ``torch.distributed`` process group, every rank
            all-gathers the student and teacher nodes of ``group`` (local ``M`` may differ) and computes
            the loss over the concatenated nodes (rank order): each node's negatives are the nodes of all
            ranks. Each rank receives the gradient of that global loss w.r.t. its own nodes (the other
            ranks' nodes are constants; no communication in backward). ``"none"`` then returns the
            global ``[M_global]`` vector, identical on every rank. Without a process group: the local loss.
        group: the process group (or 1-D ``DeviceMesh``) coupled by ``gather_across_ranks`` (default
            None: the default group).
        backend: ``"auto"`` (default: the compiled kernel when it is available), ``"kernel"`` or
            ``"reference"`` (pure PyTorch, ``O(M²)`` memory). The kernels never hold the ``M × M`` logits:
            O(M·E) extra memory, deterministic.

    Shape:
        ``student_emb [M, E]``, ``teacher_emb [M, E]`` → a scalar, or ``[M]`` for ``"none"`` (``[M_global]``
        with ``gather_across_ranks``).

    Returns:
        The loss in ``student_emb.dtype`` (computed in fp32, fp64 for fp64; fp32 under autocast).

    Example:
        >>> hs, ht = torch.randn(32, 16, requires_grad=True), torch.randn(32, 16, requires_grad=True)
        >>> token_contrastive_loss(hs, ht, temperature=0.2).backward()

    References:
        The TRG paper's global-topology term (no official code is public); van den Oord et al.,
        "Representation Learning with Contrastive Predictive Coding" (InfoNCE, 2018).
    """
    options = TokenContrastiveOptions(temperature=temperature, similarity=similarity, symmetric=symmetric,
                                      detach_teacher=detach_teacher, reduction=reduction,
                                      gather_across_ranks=gather_across_ranks)
    check_tensor(student_emb, "student_emb", ndim=2)
    check_tensor(teacher_emb, "teacher_emb", ndim=2)
    device = check_same_device(student_emb=student_emb, teacher_emb=teacher_emb)
    if teacher_emb.shape != student_emb.shape:
        raise ValueError(f"teacher_emb must have the shape of student_emb {tuple(student_emb.shape)} "
                         f"(project both to a common width E), got {tuple(teacher_emb.shape)}")
    kernel = use_kernel("token_contrastive", device, backend)
    if gather_across_ranks and group_rank_world(group)[1] > 1:
        student_emb = gather_rows(student_emb, group)
        teacher_emb = gather_rows(teacher_emb.detach() if detach_teacher else teacher_emb, group)
    if not kernel:
        from .reference.token_contrastive import token_contrastive_reference

        return token_contrastive_reference(student_emb, teacher_emb, options=options)
    return _kernel_loss(student_emb, teacher_emb, options)


_NORM_EPS = 1e-12  # F.normalize's default eps


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1)`` (``x / max(‖x‖, 1e-12)``, the same values) whose gradient is taken in
    projection form, ``(g − u·⟨u, g⟩) / max(‖x‖, 1e-12)`` (``g / 1e-12`` where the clamp is active): no
    ``1/‖x‖³`` term, so the radial component cancels to the rounding of ``g`` itself (exactly for E = 1).
    Written with detached factors rather than an autograd.Function so that torch.compile traces it."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).detach()
    scale = norm.clamp_min(_NORM_EPS)
    u = (x / scale).detach()
    radial = (norm > _NORM_EPS).to(x.dtype)
    tangent = x - radial * u * (u * x).sum(-1, keepdim=True)  # ≈ 0 in value; its gradient is the projection
    return u + (tangent / scale - tangent.detach() / scale)


def _kernel_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, options: TokenContrastiveOptions):
    """The kernel path: both sides in the accumulation dtype (normalised for cosine), then the op."""
    acc = accumulation_dtype(student_emb.dtype)
    hs, ht = student_emb.to(acc), teacher_emb.to(acc)
    if options.detach_teacher:
        ht = ht.detach()
    if options.similarity == "cosine":
        hs, ht = normalize_rows(hs), normalize_rows(ht)
    loss, _ = torch.ops.kdloss.token_contrastive_fwd(hs.contiguous(), ht.contiguous(),
                                                     _ops.float_arg(options.temperature), options.symmetric,
                                                     _ops.REDUCTION_CODES[options.reduction])
    return cast_loss(loss, student_emb.dtype)


class TokenContrastiveLoss(OptionsModule):
    """Module form of :func:`token_contrastive_loss` (experimental). Set ``loss_fn.temperature`` each step
    from :func:`kdloss.trg.temperature_schedule` to anneal it.

    Args:
        temperature, similarity, symmetric, detach_teacher, reduction, gather_across_ranks, backend: as in
        :func:`token_contrastive_loss`.
        group: as in :func:`token_contrastive_loss`; a plain attribute (runtime state, not an option).

    Shape:
        ``forward(student_emb [M, E], teacher_emb [M, E])``.

    Example:
        >>> loss_fn = TokenContrastiveLoss(temperature=0.2)
        >>> loss_fn(torch.randn(32, 16, requires_grad=True), torch.randn(32, 16)).backward()
    """

    def __init__(self, *, temperature: float = _D.temperature, similarity: str = _D.similarity,
                 symmetric: bool = _D.symmetric, detach_teacher: bool = _D.detach_teacher,
                 reduction: str = _D.reduction, gather_across_ranks: bool = _D.gather_across_ranks, group=None,
                 backend: str = "auto") -> None:
        options = TokenContrastiveOptions(temperature=temperature, similarity=similarity, symmetric=symmetric,
                                          detach_teacher=detach_teacher, reduction=reduction,
                                          gather_across_ranks=gather_across_ranks)
        super().__init__(options, backend)
        self.group = group

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
        """See :func:`token_contrastive_loss`."""
        return token_contrastive_loss(student_emb, teacher_emb, group=self.group, backend=self.backend,
                                      **self.option_kwargs())
