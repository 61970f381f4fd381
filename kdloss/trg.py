"""Token-level Relationship Graph distillation (TRG; spec §5, decision 5).

* :func:`token_contextual_loss` / :class:`TokenContextualLoss` — the token-wise contextual loss
  (TRG's ``L_inner``), exact per spec §5.2, with CPU and CUDA kernels that never store the
  ``[B, N, N]`` similarity matrices.
* :func:`token_graph_loss` / :class:`TokenGraphLoss` — kNN-graph local-structure loss (``L_local``),
  with CPU and CUDA kernels fusing the per-edge work (kNN selection in PyTorch). **Experimental.**
* :func:`token_contrastive_loss` / :class:`TokenContrastiveLoss` — cosine InfoNCE (``L_global``).
  **Experimental.**
* :class:`TRGLoss` — ``α·L_inner + β·L_local + γ·L_global`` with learnable projections and token
  sampling; helpers :func:`feature_map_to_tokens`, :func:`sample_tokens`,
  :func:`temperature_schedule`.

No official TRG code is public: every choice the paper leaves open (spec §5.2, marked ASSUMPTION)
is a keyword argument with the spec's default. The contrastive term has no compiled kernel yet:
``backend="kernel"`` raises :class:`kdloss.KernelUnavailableError` for it and ``"auto"`` uses the
reference silently (there is nothing to fall back from).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _ops
from ._build import KernelUnavailableError
from ._dispatch import use_kernel
from ._validation import (
    BACKENDS,
    REDUCTIONS,
    accumulation_dtype,
    check_option,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from .reference.token_contextual import token_contextual_reference
from .reference.token_graph import knn_indices, token_contrastive_reference, token_graph_reference

__all__ = [
    "token_contextual_loss",
    "token_graph_loss",
    "token_contrastive_loss",
    "TokenContextualLoss",
    "TokenGraphLoss",
    "TokenContrastiveLoss",
    "TRGLoss",
    "feature_map_to_tokens",
    "sample_tokens",
    "temperature_schedule",
]

LOSS = "token_contextual"
GRAPH_LOSS = "token_graph"
GRAPH_SIDES = ("teacher", "student")
EDGE_LOGITS = ("kernel", "log_kernel")
KL_DIRECTIONS = ("student_teacher", "teacher_student")
SIMILARITIES = ("cosine", "dot")
SCHEDULES = ("cosine", "linear", "exponential", "constant")


def _check_positive(value, name: str, *, integer: bool = False, allow_zero: bool = False):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not -math.inf < value < math.inf \
            or (value < 0 if allow_zero else value <= 0):
        what = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {what} {'≥ 0' if allow_zero else '> 0'}, got {value!r}")
    return value


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _reference_only(loss: str, backend: str) -> None:
    """The backend contract for a loss without compiled kernels (the contrastive term)."""
    check_option(backend, "backend", BACKENDS)
    if backend == "kernel":
        raise KernelUnavailableError(
            f"backend='kernel': kdloss {loss} has no compiled kernel (reference only, experimental); "
            'use backend="auto" or "reference"'
        )


# ----------------------------------------------------------------------------------------------
# Contextual loss (L_inner)


def token_contextual_loss(
    student_tokens: torch.Tensor,
    teacher_tokens: torch.Tensor,
    *,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Token-wise contextual loss (TRG ``L_inner``, spec §5.2).

    Per image, ``CS = softmax_row(F·Fᵀ / √D)`` over its N tokens for the student (``D = Ds``) and
    the teacher (``D = Dt``), and ``MSE(CS^T, CS^S)``. ASSUMPTIONS (spec §5.2): raw tokens (no
    normalisation), row softmax, mean over B·N·N.

    Args:
        student_tokens: ``[B, N, Ds]``, any float dtype; receives the gradient.
        teacher_tokens: ``[B, N, Dt]``, a constant (detached); ``Dt`` may differ from ``Ds``.
        reduction: ``"mean"`` (default, over B·N·N — ``nn.MSELoss``), ``"sum"``, or ``"none"`` →
            ``[B, N]``: each row's mean over its N columns (``none.mean() == mean``).
        backend: ``"auto"`` | ``"kernel"`` | ``"reference"`` (spec §0). The kernels tile the
            similarity rows and never store a ``[B, N, N]`` tensor (O(B·N) extra memory).

    Returns:
        The loss in ``student_tokens.dtype`` (computed in fp32, fp64 for fp64). Empty inputs give 0.
    """
    check_tensor(student_tokens, "student_tokens", ndim=3)
    check_tensor(teacher_tokens, "teacher_tokens", ndim=3)
    check_option(reduction, "reduction", REDUCTIONS)
    device = check_same_device(student_tokens=student_tokens, teacher_tokens=teacher_tokens)
    batch, n, ds = student_tokens.shape
    if teacher_tokens.shape[:2] != student_tokens.shape[:2]:
        raise ValueError(
            f"teacher_tokens must be [B, N, Dt] with B = {batch}, N = {n} (from student_tokens), "
            f"got shape {tuple(teacher_tokens.shape)}"
        )
    if ds == 0:
        raise ValueError(f"student_tokens must have a positive width Ds, got shape {tuple(student_tokens.shape)}")
    if teacher_tokens.shape[2] == 0:
        raise ValueError(f"teacher_tokens must have a positive width Dt, got shape {tuple(teacher_tokens.shape)}")
    if not use_kernel(LOSS, device, backend):
        return token_contextual_reference(student_tokens, teacher_tokens, reduction)
    teacher = teacher_tokens.detach().contiguous()
    outputs = torch.ops.kdloss.token_contextual_fwd(
        student_tokens.contiguous(), teacher, _ops.REDUCTION_CODES[reduction]
    )
    return outputs[0]


class TokenContextualLoss(nn.Module):
    """Module form of :func:`token_contextual_loss`: ``TokenContextualLoss(reduction="mean",
    backend="auto")(student_tokens [B, N, Ds], teacher_tokens [B, N, Dt])``."""

    def __init__(self, *, reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        self.reduction = check_option(reduction, "reduction", REDUCTIONS)
        self.backend = check_option(backend, "backend", BACKENDS)

    def forward(self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
        return token_contextual_loss(student_tokens, teacher_tokens, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"


# ----------------------------------------------------------------------------------------------
# Graph loss (L_local) — experimental


def _check_neighbours(neighbours, m: int, device: torch.device) -> torch.Tensor:
    """``neighbours`` must be an integer ``[M, k']`` tensor on ``device`` with values in ``[0, M)``;
    returns it as int64. (The value check needs a host sync; it is skipped while compiling.)"""
    if not isinstance(neighbours, torch.Tensor):
        raise ValueError(f"neighbours must be a torch.Tensor or None, got {type(neighbours).__name__}")
    if neighbours.dtype.is_floating_point or neighbours.dtype.is_complex or neighbours.dtype == torch.bool:
        raise ValueError(f"neighbours must be an integer tensor, got dtype {neighbours.dtype}")
    if neighbours.dim() != 2 or neighbours.shape[0] != m:
        raise ValueError(f"neighbours must be [M, k] with M = {m} (from student_nodes), got shape "
                         f"{tuple(neighbours.shape)}")
    if neighbours.device != device:
        raise ValueError(f"neighbours must be on {device} (the device of student_nodes), got {neighbours.device}")
    neighbours = neighbours.detach().long()
    if not torch.compiler.is_compiling() and neighbours.numel() > 0:
        if bool(((neighbours < 0) | (neighbours >= m)).any()):
            raise ValueError(f"neighbours must hold node indices in [0, M) with M = {m}, got values in "
                             f"[{int(neighbours.min())}, {int(neighbours.max())}]")
    return neighbours


def _check_graph_args(k, sigma, graph, edge, kl_direction, reduction):
    _check_positive(k, "k", integer=True)
    _check_positive(sigma, "sigma")
    check_option(graph, "graph", GRAPH_SIDES)
    check_option(edge, "edge", EDGE_LOGITS)
    check_option(kl_direction, "kl_direction", KL_DIRECTIONS)
    check_option(reduction, "reduction", REDUCTIONS)


def token_graph_loss(
    student_nodes: torch.Tensor,
    teacher_nodes: torch.Tensor,
    *,
    k: int = 8,
    sigma: float = 1.0,
    graph: str = "teacher",
    edge: str = "kernel",
    kl_direction: str = "student_teacher",
    reduction: str = "mean",
    neighbours: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """kNN-graph local-structure loss (TRG ``L_local``, spec §5.2). **Experimental.**

    Neighbours of node i: its k nearest other nodes on the ``graph`` side (squared Euclidean
    distance, chosen without gradient), shared by both models. Edge logits ``a_ij`` = Gaussian kernel
    ``exp(−‖x_i − x_j‖² / (2σ))`` (``edge="kernel"``) or its log (``"log_kernel"``), in each model's
    own feature space; ``p_i = softmax_j(a_ij)``; ``KL(p^S_i ‖ p^T_i)``; mean over nodes.

    Args:
        student_nodes: ``[M, Ds]`` (e.g. sampled tokens of the whole batch); receives the gradient.
        teacher_nodes: ``[M, Dt]``, a constant.
        k: neighbours per node, ``1 ≤ k ≤ M − 1`` (default 8; ASSUMPTION).
        sigma: kernel width σ > 0 (default 1.0; ASSUMPTION — scale it to the squared feature
            distances, or the kernel underflows and the gradient vanishes, spec §5.4).
        graph: whose kNN defines the edges: ``"teacher"`` (default, ASSUMPTION) or ``"student"``.
        edge: ``"kernel"`` (default: softmax over kernel values, LSP style; ASSUMPTION) or
            ``"log_kernel"`` (softmax over ``−d²/2σ``).
        kl_direction: ``"student_teacher"`` = ``KL(p^S ‖ p^T)`` (default; ASSUMPTION) or
            ``"teacher_student"``.
        reduction: ``"mean"`` over nodes (default; ASSUMPTION), ``"sum"`` or ``"none"`` (``[M]``).
        neighbours: optional ``[M, k']`` integer tensor of node indices in ``[0, M)`` that replaces
            the kNN selection (default None: the kNN of the ``graph`` side); its width ``k'`` is the
            number of edges per node (``k`` and ``graph`` are then unused; ``k' = 0`` gives 0).
            Self-edges and repeated neighbours are allowed (they are just edges).
        backend: ``"auto"`` | ``"kernel"`` | ``"reference"`` (spec §0). The kernels (CPU and CUDA)
            fuse the edge distances, both log-softmaxes and the KL in one pass over the ``M·k``
            edges and keep ``O(M·k)`` state; the kNN selection runs in PyTorch (GEMM + ``topk``).

    Returns:
        The loss in ``student_nodes.dtype`` (computed in fp32, fp64 for fp64): a scalar, or ``[M]``
        for ``reduction="none"``. ``M = 0`` gives 0 with a zero gradient.
    """
    check_tensor(student_nodes, "student_nodes", ndim=2)
    check_tensor(teacher_nodes, "teacher_nodes", ndim=2)
    _check_graph_args(k, sigma, graph, edge, kl_direction, reduction)
    device = check_same_device(student_nodes=student_nodes, teacher_nodes=teacher_nodes)
    m = student_nodes.shape[0]
    if teacher_nodes.shape[0] != m:
        raise ValueError(f"teacher_nodes must be [M, Dt] with M = {m} (from student_nodes), "
                         f"got shape {tuple(teacher_nodes.shape)}")
    if student_nodes.shape[1] == 0:
        raise ValueError(f"student_nodes must have a positive width Ds, got shape {tuple(student_nodes.shape)}")
    if teacher_nodes.shape[1] == 0:
        raise ValueError(f"teacher_nodes must have a positive width Dt, got shape {tuple(teacher_nodes.shape)}")
    acc = accumulation_dtype(student_nodes.dtype)
    if neighbours is None:
        if m > 0 and k > m - 1:
            raise ValueError(f"k must be at most M − 1 = {m - 1} (neighbours exclude the node itself), got {k}")
        side = teacher_nodes if graph == "teacher" else student_nodes
        neighbours = knn_indices(side.detach().to(acc), k)
    else:
        neighbours = _check_neighbours(neighbours, m, device)
    if not use_kernel(GRAPH_LOSS, device, backend):
        return token_graph_reference(student_nodes, teacher_nodes, k, float(sigma), graph=graph, edge=edge,
                                     kl_direction=kl_direction, reduction=reduction, neighbours=neighbours)
    outputs = torch.ops.kdloss.token_graph_fwd(
        student_nodes.contiguous(), teacher_nodes.detach().to(acc).contiguous(), neighbours.contiguous(),
        float(sigma), _ops.token_graph.EDGE_CODES[edge], _ops.token_graph.DIRECTION_CODES[kl_direction],
        _ops.REDUCTION_CODES[reduction],
    )
    return outputs[0]


class TokenGraphLoss(nn.Module):
    """Module form of :func:`token_graph_loss` (experimental): ``TokenGraphLoss(k=8, sigma=1.0,
    graph="teacher", edge="kernel", kl_direction="student_teacher", reduction="mean",
    backend="auto")(student_nodes [M, Ds], teacher_nodes [M, Dt], neighbours [M, k'] = None)``."""

    def __init__(self, *, k: int = 8, sigma: float = 1.0, graph: str = "teacher", edge: str = "kernel",
                 kl_direction: str = "student_teacher", reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        _check_graph_args(k, sigma, graph, edge, kl_direction, reduction)
        self.k, self.sigma, self.graph, self.edge = k, float(sigma), graph, edge
        self.kl_direction, self.reduction = kl_direction, reduction
        self.backend = check_option(backend, "backend", BACKENDS)

    def forward(self, student_nodes: torch.Tensor, teacher_nodes: torch.Tensor,
                neighbours: torch.Tensor | None = None) -> torch.Tensor:
        return token_graph_loss(student_nodes, teacher_nodes, k=self.k, sigma=self.sigma, graph=self.graph,
                                edge=self.edge, kl_direction=self.kl_direction, reduction=self.reduction,
                                neighbours=neighbours, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"k={self.k}, sigma={self.sigma}, graph={self.graph!r}, edge={self.edge!r}, "
                f"kl_direction={self.kl_direction!r}, reduction={self.reduction!r}, backend={self.backend!r}")


# ----------------------------------------------------------------------------------------------
# Contrastive loss (L_global) — experimental


def _check_contrastive_args(temperature, similarity, symmetric, detach_teacher, reduction):
    _check_positive(temperature, "temperature")
    check_option(similarity, "similarity", SIMILARITIES)
    _check_bool(symmetric, "symmetric")
    _check_bool(detach_teacher, "detach_teacher")
    check_option(reduction, "reduction", REDUCTIONS)


def token_contrastive_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    *,
    temperature: float = 0.1,
    similarity: str = "cosine",
    symmetric: bool = False,
    detach_teacher: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Global-topology InfoNCE (TRG ``L_global``, spec §5.2). **Experimental.**

    Logits ``sim(h^S_i, h^T_j) / τ`` over all node pairs; the positive of student node i is teacher
    node i, the negatives are the other teacher nodes; cross-entropy (log-softmax form), mean over
    nodes.

    Args:
        student_emb: ``[M, E]`` projected student nodes.
        teacher_emb: ``[M, E]`` projected teacher nodes. Unlike other losses' teachers it receives a
            gradient by default (TRG trains the teacher-side projection head; spec §5.2).
        temperature: τ > 0 (default 0.1; ASSUMPTION — TRG anneals it, see :func:`temperature_schedule`).
        similarity: ``"cosine"`` (default; ASSUMPTION) or ``"dot"``.
        symmetric: also average the teacher→student direction (default False: teacher-side
            negatives only; ASSUMPTION).
        detach_teacher: stop the gradient into ``teacher_emb`` (default False).
        reduction: ``"mean"`` over nodes (default), ``"sum"`` or ``"none"`` (``[M]``).
        backend: reference only for now: ``"kernel"`` raises :class:`KernelUnavailableError`.
    """
    check_tensor(student_emb, "student_emb", ndim=2)
    check_tensor(teacher_emb, "teacher_emb", ndim=2)
    _check_contrastive_args(temperature, similarity, symmetric, detach_teacher, reduction)
    check_same_device(student_emb=student_emb, teacher_emb=teacher_emb)
    if teacher_emb.shape != student_emb.shape:
        raise ValueError(f"teacher_emb must have the shape of student_emb {tuple(student_emb.shape)} "
                         f"(project both to a common width E), got {tuple(teacher_emb.shape)}")
    _reference_only("token_contrastive", backend)
    return token_contrastive_reference(student_emb, teacher_emb, float(temperature), similarity=similarity,
                                       symmetric=symmetric, detach_teacher=detach_teacher, reduction=reduction)


class TokenContrastiveLoss(nn.Module):
    """Module form of :func:`token_contrastive_loss` (experimental). ``temperature`` is a plain
    attribute: set it each step from :func:`temperature_schedule`."""

    def __init__(self, *, temperature: float = 0.1, similarity: str = "cosine", symmetric: bool = False,
                 detach_teacher: bool = False, reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        _check_contrastive_args(temperature, similarity, symmetric, detach_teacher, reduction)
        self.temperature, self.similarity, self.symmetric = float(temperature), similarity, symmetric
        self.detach_teacher, self.reduction = detach_teacher, reduction
        self.backend = check_option(backend, "backend", BACKENDS)

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
        return token_contrastive_loss(student_emb, teacher_emb, temperature=self.temperature,
                                      similarity=self.similarity, symmetric=self.symmetric,
                                      detach_teacher=self.detach_teacher, reduction=self.reduction,
                                      backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, similarity={self.similarity!r}, symmetric={self.symmetric}, "
                f"detach_teacher={self.detach_teacher}, reduction={self.reduction!r}, backend={self.backend!r}")


# ----------------------------------------------------------------------------------------------
# Helpers


def feature_map_to_tokens(feature_map: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """CNN feature map ``[B, C, H, W]`` → tokens ``[B, (H/p)·(W/p), C·p·p]`` from non-overlapping
    ``p × p`` patches (``unfold``; spec §5.2). ``patch_size`` (ASSUMPTION, default 1: one token per
    spatial position) must divide H and W."""
    check_tensor(feature_map, "feature_map", ndim=4)
    _check_positive(patch_size, "patch_size", integer=True)
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
    student ``[B, N, Ds]`` and teacher ``[B, N, Dt]`` (spec §5.4). Returns the sampled student
    ``[B, n, Ds]`` and teacher ``[B, n, Dt]`` tokens and the indices ``[B, n]``. Gradients flow
    through the gather."""
    check_tensor(student_tokens, "student_tokens", ndim=3)
    check_tensor(teacher_tokens, "teacher_tokens", ndim=3)
    check_same_device(student_tokens=student_tokens, teacher_tokens=teacher_tokens)
    if teacher_tokens.shape[:2] != student_tokens.shape[:2]:
        raise ValueError(f"teacher_tokens must share B and N with student_tokens {tuple(student_tokens.shape[:2])}, "
                         f"got shape {tuple(teacher_tokens.shape)}")
    batch, n, _ = student_tokens.shape
    _check_positive(num_samples, "num_samples", integer=True, allow_zero=True)
    if num_samples > n:
        raise ValueError(f"num_samples must be at most N = {n}, got {num_samples}")
    noise = torch.rand(batch, n, generator=generator, device="cpu" if generator is None else generator.device)
    index = noise.argsort(dim=1)[:, :num_samples].to(student_tokens.device)

    def gather(x):
        return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    return gather(student_tokens), gather(teacher_tokens), index


def temperature_schedule(step: int, total_steps: int, *, start: float = 1.0, end: float = 0.07,
                         kind: str = "cosine") -> float:
    """Dynamic InfoNCE temperature, high → low (coarse → fine structure; TRG's τ_g, spec §5.1).
    ``kind``: ``"cosine"`` (default), ``"linear"``, ``"exponential"`` (geometric) or ``"constant"``
    (always ``start``). Steps past ``total_steps`` stay at ``end``. All values are ASSUMPTIONS."""
    _check_positive(step, "step", integer=True, allow_zero=True)
    _check_positive(total_steps, "total_steps", integer=True)
    _check_positive(start, "start")
    _check_positive(end, "end")
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
    **The graph and contrastive terms are experimental** (spec §5, decision 5).

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
        alpha, beta, gamma: term weights (default 1.0 each; ASSUMPTION). A zero weight skips its term.
        embed_dim: projection width E (default 256; ASSUMPTION).
        num_samples: tokens sampled per image for the graph terms (default 64; ASSUMPTION).
        k, sigma, graph, edge, kl_direction: as in :func:`token_graph_loss`.
        temperature, similarity, symmetric, detach_teacher: as in :func:`token_contrastive_loss`;
            update ``self.temperature`` from :func:`temperature_schedule` during training.
        backend: passed to the contextual and graph terms (the contrastive term is reference only).

    The logit-KD and cross-entropy terms of the paper's total are left to the caller. With
    ``return_terms=True``, ``forward`` returns ``(total, {"inner": …, "local": …, "global": …})``.
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, alpha: float = 1.0, beta: float = 1.0,
                 gamma: float = 1.0, embed_dim: int = 256, num_samples: int | None = 64, k: int = 8,
                 sigma: float = 1.0, graph: str = "teacher", edge: str = "kernel",
                 kl_direction: str = "student_teacher", temperature: float = 0.1, similarity: str = "cosine",
                 symmetric: bool = False, detach_teacher: bool = False, backend: str = "auto") -> None:
        super().__init__()
        _check_positive(student_dim, "student_dim", integer=True)
        _check_positive(teacher_dim, "teacher_dim", integer=True)
        _check_positive(embed_dim, "embed_dim", integer=True)
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            _check_positive(value, name, allow_zero=True)
        if num_samples is not None:
            _check_positive(num_samples, "num_samples", integer=True)
        _check_graph_args(k, sigma, graph, edge, kl_direction, "mean")
        _check_contrastive_args(temperature, similarity, symmetric, detach_teacher, "mean")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.num_samples = num_samples
        self.graph_loss = TokenGraphLoss(k=k, sigma=sigma, graph=graph, edge=edge, kl_direction=kl_direction,
                                         backend=backend)
        self.contrastive_loss = TokenContrastiveLoss(temperature=temperature, similarity=similarity,
                                                     symmetric=symmetric, detach_teacher=detach_teacher)
        self.backend = check_option(backend, "backend", BACKENDS)
        self.student_proj = nn.Linear(student_dim, embed_dim)
        self.teacher_proj = nn.Linear(teacher_dim, embed_dim)

    @property
    def temperature(self) -> float:
        return self.contrastive_loss.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.contrastive_loss.temperature = float(_check_positive(value, "temperature"))

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
