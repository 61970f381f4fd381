"""Token-graph benchmark cases: kdloss kernel (blocked kNN, fused per-edge pass) vs the eager formula
(full distance matrix + ``topk``, then gathered differences, kernels, log-softmaxes, KL) vs
torch.compile(eager), with the kNN selection ("graph") and with given neighbours ("graph-edges", the edge
work alone). Reproduce the M=4096 row with ``python -m kdloss.bench --loss token_graph --dtype float32``."""

from __future__ import annotations

import torch

from ..reference.token_graph import token_graph_reference
from ..token_graph import knn_indices, token_graph_loss
from . import Case

# (M, Ds, Dt, k): 16 images × 64 sampled ViT-S/ViT-B tokens; 4096 nodes of width 768
SHAPES = [(1024, 384, 768, 8), (4096, 768, 768, 8)]
QUICK_SHAPES = [(64, 32, 48, 4), (256, 64, 64, 8)]
SIGMA = 768.0  # of the order of the squared distances of unit-variance features


def eager(student, teacher, k):
    """The graph loss as user code writes it: kNN of the teacher from the full distance matrix
    (``cdist`` + ``topk``), then the reference's edge terms."""
    with torch.no_grad():
        dist = torch.cdist(teacher, teacher).pow(2)
        dist.fill_diagonal_(float("inf"))
        neighbours = dist.topk(k, dim=1, largest=False).indices
    return token_graph_reference(student, teacher.detach(), neighbours=neighbours, k=k, sigma=SIGMA)


def edges_eager(student, teacher, neighbours):
    """The edge work alone (neighbours given)."""
    return token_graph_reference(student, teacher.detach(), neighbours=neighbours, k=max(1, neighbours.shape[1]),
                                 sigma=SIGMA)


def _maker(m, ds, dt, k, device, dtype, with_neighbours):
    def make():
        gen = torch.Generator().manual_seed(0)
        student = torch.randn(m, ds, generator=gen).to(device, dtype).requires_grad_()
        teacher = torch.randn(m, dt, generator=gen).to(device, dtype)
        if with_neighbours:
            return student, teacher, knn_indices(teacher, k)
        return student, teacher

    return make


def cases(device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    """Graph-loss cases, forward + backward: with the kNN selection ("graph") and with given neighbours."""
    out = []
    compiled, compiled_edges = torch.compile(eager), torch.compile(edges_eager)
    for dtype in dtypes:
        for m, ds, dt, k in QUICK_SHAPES if quick else SHAPES:
            shape = f"M={m} Ds={ds} Dt={dt} k={k}"
            out.append(Case("token_graph", "graph", shape, dtype, device, _maker(m, ds, dt, k, device, dtype, False), {
                "kdloss": lambda s, t, k=k: token_graph_loss(s, t, k=k, sigma=SIGMA, backend="kernel"),
                "eager": lambda s, t, k=k: eager(s, t, k),
                "compile": lambda s, t, k=k: compiled(s, t, k),
            }))
            out.append(Case("token_graph", "graph-edges", shape, dtype, device,
                            _maker(m, ds, dt, k, device, dtype, True), {
                                "kdloss": lambda s, t, nb: token_graph_loss(s, t, sigma=SIGMA, neighbours=nb,
                                                                            backend="kernel"),
                                "eager": edges_eager,
                                "compile": compiled_edges,
                            }))
    return out
