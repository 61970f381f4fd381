"""kNN-graph local-structure loss (TRG's ``L_local``): :func:`token_graph_loss` and :class:`TokenGraphLoss`.
**Experimental.**

Nodes are tokens (e.g. the sampled tokens of a whole batch). The neighbours of node i are its k nearest
other nodes on one side (the teacher's by default, so both models' softmaxes live on the same edges),
chosen without gradient. On those edges each model has edge logits ``a_ij`` from its own features — the
Gaussian kernel ``exp(−‖x_i − x_j‖² / (2σ))`` (LSP style) or its log — and ``p_i = softmax_j(a_ij)``; the
loss is ``KL(p^S_i ‖ p^T_i)`` averaged over nodes. The TRG paper publishes no code; each of these choices
is an option. The CPU and CUDA kernels fuse the per-edge work in one pass over the ``M·k`` edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops
from ._autocast import cast_loss, no_autocast
from ._dispatch import use_kernel
from ._options import OptionsModule
from ._validation import (
    REDUCTIONS,
    accumulation_dtype,
    check_index_tensor,
    check_int,
    check_option,
    check_same_device,
    check_scale,
    check_tensor,
    has_data,
)

__all__ = ["TokenGraphLoss", "TokenGraphOptions", "knn_indices", "token_graph_loss"]

GRAPH_SIDES = ("teacher", "student")
EDGE_LOGITS = ("kernel", "log_kernel")
KL_DIRECTIONS = ("student_teacher", "teacher_student")


@dataclass(frozen=True)
class TokenGraphOptions:
    """Options of :func:`token_graph_loss`.

    Args:
        k: neighbours per node, ``1 ≤ k ≤ M − 1`` (default 8).
        sigma: kernel width σ > 0 (default 1.0). Scale it to the squared feature distances, or the kernel
            underflows and the gradient vanishes.
        graph: whose kNN defines the edges: ``"teacher"`` (default) or ``"student"``.
        edge: ``"kernel"`` (default: softmax over the kernel values, LSP style) or ``"log_kernel"``
            (softmax over ``−d²/2σ``).
        kl_direction: ``"student_teacher"`` = ``KL(p^S ‖ p^T)`` (default, as TRG writes it) or
            ``"teacher_student"``.
        reduction: ``"mean"`` over nodes (default), ``"sum"`` or ``"none"`` (``[M]``).
    """

    k: int = 8
    sigma: float = 1.0
    graph: str = "teacher"
    edge: str = "kernel"
    kl_direction: str = "student_teacher"
    reduction: str = "mean"

    def __post_init__(self) -> None:
        check_int(self.k, "k", low=1)
        check_scale(self.sigma, "sigma")
        check_option(self.graph, "graph", GRAPH_SIDES)
        check_option(self.edge, "edge", EDGE_LOGITS)
        check_option(self.kl_direction, "kl_direction", KL_DIRECTIONS)
        check_option(self.reduction, "reduction", REDUCTIONS)


#: distance entries per block of the PyTorch kNN path (rows × M)
_KNN_BLOCK_ELEMENTS = 1 << 22


@torch.no_grad()
def knn_indices(nodes: torch.Tensor, k: int, *, backend: str = "auto") -> torch.Tensor:
    """Indices ``[M, k]`` of the k nearest other nodes of each node of ``nodes [M, D]``, without gradient.

    The distance is ``d_ij = max(‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩, 0)`` in the accumulation dtype (fp32; fp64
    for fp64), a NaN distance counting as +inf; the node itself is excluded (a duplicate of it is not).
    Each row is ordered by ``(d_ij, j)`` ascending: **equal distances go to the smaller index**, so the
    selection is one well-defined set on data with exact ties (duplicated points, grids).

    No ``[M, M]`` matrix is built: on CPU the compiled kernel runs a blocked top-k over GEMM tiles
    (each distance computed once, both triangles served by one tile; O(M·k) state); on other devices,
    with ``backend="reference"`` or without the compiled kernel, blocks of rows are ranked against all
    nodes in PyTorch (``rows × M`` distances at a time). Both follow the definition above; they can
    only differ where two distances agree to rounding.

    Args:
        nodes: ``[M, D]`` float tensor.
        k: neighbours per node, ``0 ≤ k ≤ M − 1``.
        backend: ``"auto"``, ``"kernel"`` or ``"reference"``, as for the losses.

    Returns:
        ``[M, k]`` int64 on the device of ``nodes``.

    Example:
        >>> knn_indices(torch.tensor([[0.0], [1.0], [3.0]]), 1)
        tensor([[1],
                [0],
                [1]])
    """
    m = nodes.shape[0]
    if m > 0 and not 0 <= k <= m - 1:
        raise ValueError(f"k must lie in [0, M − 1] = [0, {m - 1}] (neighbours exclude the node itself), got {k}")
    if m == 0 or k == 0:
        return torch.empty(m, k, dtype=torch.long, device=nodes.device)
    x = nodes.detach().to(accumulation_dtype(nodes.dtype)).contiguous()
    if use_kernel("token_graph", x.device, backend) and x.device.type == "cpu":
        return torch.ops.kdloss.token_graph_knn(x, k)
    with no_autocast(x.device.type):  # distances in the accumulation dtype even inside autocast
        return _knn_blocked(x, k)


def _knn_blocked(x: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`knn_indices` in PyTorch, a block of rows at a time (a stable sort keeps ties by index)."""
    m = x.shape[0]
    norms = (x * x).sum(1)
    rows = max(1, min(m, _KNN_BLOCK_ELEMENTS // m))
    out = torch.empty(m, k, dtype=torch.long, device=x.device)
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        dots = x[start:stop] @ x.T
        dist = ((norms[start:stop, None] + norms[None, :]) - (dots + dots)).clamp_min_(0)
        dist = dist.nan_to_num_(nan=float("inf"), posinf=float("inf"))
        own = torch.arange(start, stop, device=x.device)
        dist[own - start, own] = float("nan")  # sorts after +inf: the node itself is never chosen
        out[start:stop] = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    return out


def _check_neighbours(neighbours, m: int, device: torch.device) -> torch.Tensor:
    """``neighbours`` must be an integer ``[M, k']`` tensor on ``device`` with values in ``[0, M)``; returns
    it as int64. (The value check needs a host sync; it is skipped while compiling.)"""
    check_index_tensor(neighbours, "neighbours")
    if neighbours.dim() != 2 or neighbours.shape[0] != m:
        raise ValueError(f"neighbours must be [M, k] with M = {m} (from student_nodes), got shape "
                         f"{tuple(neighbours.shape)}")
    if neighbours.device != device:
        raise ValueError(f"neighbours must be on {device} (the device of student_nodes), got {neighbours.device}")
    neighbours = neighbours.detach().long()
    if has_data(neighbours) and neighbours.numel() > 0:
        if bool(((neighbours < 0) | (neighbours >= m)).any()):
            raise ValueError(f"neighbours must hold node indices in [0, M) with M = {m}, got values in "
                             f"[{int(neighbours.min())}, {int(neighbours.max())}]")
    return neighbours


def _check_nodes(student_nodes, teacher_nodes) -> torch.device:
    check_tensor(student_nodes, "student_nodes", ndim=2)
    check_tensor(teacher_nodes, "teacher_nodes", ndim=2)
    device = check_same_device(student_nodes=student_nodes, teacher_nodes=teacher_nodes)
    m = student_nodes.shape[0]
    if teacher_nodes.shape[0] != m:
        raise ValueError(f"teacher_nodes must be [M, Dt] with M = {m} (from student_nodes), "
                         f"got shape {tuple(teacher_nodes.shape)}")
    if student_nodes.shape[1] == 0:
        raise ValueError(f"student_nodes must have a positive width Ds, got shape {tuple(student_nodes.shape)}")
    if teacher_nodes.shape[1] == 0:
        raise ValueError(f"teacher_nodes must have a positive width Dt, got shape {tuple(teacher_nodes.shape)}")
    return device


def graph_neighbours(student_nodes, teacher_nodes, neighbours, options: TokenGraphOptions,
                     backend: str = "auto") -> torch.Tensor:
    """The ``[M, k']`` int64 edge list: ``neighbours`` checked, or the kNN of the ``graph`` side (selected
    by ``backend``, see :func:`knn_indices`)."""
    m = student_nodes.shape[0]
    if neighbours is not None:
        return _check_neighbours(neighbours, m, student_nodes.device)
    if m > 0 and options.k > m - 1:
        raise ValueError(f"k must be at most M − 1 = {m - 1} (neighbours exclude the node itself), got {options.k}")
    side = teacher_nodes if options.graph == "teacher" else student_nodes
    return knn_indices(side, options.k, backend=backend)


_D = TokenGraphOptions


def token_graph_loss(
    student_nodes: torch.Tensor,
    teacher_nodes: torch.Tensor,
    *,
    k: int = _D.k,
    sigma: float = _D.sigma,
    graph: str = _D.graph,
    edge: str = _D.edge,
    kl_direction: str = _D.kl_direction,
    reduction: str = _D.reduction,
    neighbours: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """kNN-graph local-structure loss (TRG ``L_local``). **Experimental.**

    Args:
        student_nodes: ``[M, Ds]`` (e.g. sampled tokens of the whole batch); receives the gradient.
        teacher_nodes: ``[M, Dt]``, a constant.
        k, sigma, graph, edge, kl_direction, reduction: see :class:`TokenGraphOptions`.
        neighbours: optional ``[M, k']`` integer tensor of node indices in ``[0, M)`` that replaces the kNN
            selection (default None: the kNN of the ``graph`` side); its width ``k'`` is the number of edges
            per node (``k`` and ``graph`` are then unused; ``k' = 0`` gives 0). Self-edges and repeated
            neighbours are allowed (they are just edges).
        backend: ``"auto"``, ``"kernel"`` or ``"reference"``. The kernels fuse the edge distances, both
            log-softmaxes and the KL in one pass over the ``M·k`` edges (O(M·k) state); the kNN selection
            is :func:`knn_indices` (a blocked top-k, no ``[M, M]`` matrix).

    Shape:
        ``student_nodes [M, Ds]``, ``teacher_nodes [M, Dt]`` → a scalar, or ``[M]`` for ``"none"``.

    Returns:
        The loss in ``student_nodes.dtype`` (computed in fp32, fp64 for fp64; fp32 under autocast).
        ``M = 0`` gives 0 with a zero gradient.

    Example:
        >>> student = torch.randn(64, 32, requires_grad=True)
        >>> token_graph_loss(student, torch.randn(64, 48), k=4, sigma=32.0).backward()

    References:
        The TRG paper's local-structure term (no official code is public); Yang et al., "Distilling
        Knowledge from Graph Convolutional Networks" (LSP, 2020).
    """
    options = TokenGraphOptions(k=k, sigma=sigma, graph=graph, edge=edge, kl_direction=kl_direction,
                                reduction=reduction)
    device = _check_nodes(student_nodes, teacher_nodes)
    kernel = use_kernel("token_graph", device, backend)
    edges = graph_neighbours(student_nodes, teacher_nodes, neighbours, options, "kernel" if kernel else "reference")
    if not kernel:
        from .reference.token_graph import token_graph_reference

        return token_graph_reference(student_nodes, teacher_nodes, neighbours=edges, options=options)
    acc = accumulation_dtype(student_nodes.dtype)
    outputs = torch.ops.kdloss.token_graph_fwd(
        student_nodes.contiguous(), teacher_nodes.detach().to(acc).contiguous(), edges.contiguous(),
        _ops.float_arg(sigma), _ops.token_graph.EDGE_CODES[edge], _ops.token_graph.DIRECTION_CODES[kl_direction],
        _ops.REDUCTION_CODES[reduction],
    )
    return cast_loss(outputs[0], student_nodes.dtype)


class TokenGraphLoss(OptionsModule):
    """Module form of :func:`token_graph_loss` (experimental).

    Args:
        k, sigma, graph, edge, kl_direction, reduction, backend: as in :func:`token_graph_loss`.

    Shape:
        ``forward(student_nodes [M, Ds], teacher_nodes [M, Dt], neighbours [M, k'] = None)``.

    Example:
        >>> loss_fn = TokenGraphLoss(k=4, sigma=32.0)
        >>> loss_fn(torch.randn(64, 32, requires_grad=True), torch.randn(64, 48)).backward()
    """

    def __init__(self, *, k: int = _D.k, sigma: float = _D.sigma, graph: str = _D.graph, edge: str = _D.edge,
                 kl_direction: str = _D.kl_direction, reduction: str = _D.reduction, backend: str = "auto") -> None:
        options = TokenGraphOptions(k=k, sigma=sigma, graph=graph, edge=edge, kl_direction=kl_direction,
                                    reduction=reduction)
        super().__init__(options, backend)

    def forward(self, student_nodes: torch.Tensor, teacher_nodes: torch.Tensor,
                neighbours: torch.Tensor | None = None) -> torch.Tensor:
        """See :func:`token_graph_loss`."""
        return token_graph_loss(student_nodes, teacher_nodes, neighbours=neighbours, backend=self.backend,
                                **self.option_kwargs())
