"""TRG benchmark cases. Contextual loss: kdloss kernel (tiled, no [B, N, N] tensor) vs the eager
formula (two batched GEMMs, two softmaxes, MSELoss) vs torch.compile(eager). Graph loss: kdloss
kernel (fused per-edge pass) vs the eager reference (gathered differences, kernels, log-softmaxes,
KL) vs torch.compile(eager), with the kNN selection ("graph") and with given neighbours
("graph-edges", the edge work alone)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..functional import token_contextual_loss, token_graph_loss
from ..reference.token_graph import knn_indices, token_graph_reference
from ..testing.token_contextual import build
from . import Case, fuzz_case_inputs

# (B, N, D): ViT-S/16 at 224² (197 tokens, width 384); a long-sequence case (1024 tokens, width 768)
SHAPES = [(16, 197, 384), (4, 1024, 768)]
QUICK_SHAPES = [(2, 64, 64)]
# graph loss (M, Ds, Dt, k): 16 images × 64 sampled ViT-S/ViT-B tokens; 4096 nodes of width 768
GRAPH_SHAPES = [(1024, 384, 768, 8), (4096, 768, 768, 8)]
GRAPH_QUICK_SHAPES = [(64, 32, 48, 4)]
GRAPH_SIGMA = 768.0  # of the order of the squared distances of unit-variance features


def eager(student, teacher):
    """The loss as user code writes it (spec §5.2)."""
    def context(x):
        return torch.softmax(x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1]), dim=-1)

    return F.mse_loss(context(student), context(teacher.detach()))


def _maker(batch, n, dim, device, dtype):
    case = {"batch": batch, "tokens": n, "ds": dim, "dt": dim, "reduction": "mean", "layout": "contiguous",
            "magnitude": 1.0, "seed": 0}
    return fuzz_case_inputs(build, case, device, dtype)


def cases(device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    out = []
    compiled = torch.compile(eager)
    for dtype in dtypes:
        for batch, n, dim in QUICK_SHAPES if quick else SHAPES:
            out.append(Case("token_contextual", "contextual", f"B={batch} N={n} D={dim}", dtype, device,
                            _maker(batch, n, dim, device, dtype), {
                                "kdloss": lambda s, t: token_contextual_loss(s, t, backend="kernel"),
                                "eager": eager,
                                "compile": compiled,
                            }))
    return out + graph_cases(device, dtypes, quick)


def graph_eager(student, teacher, k):
    """The graph loss as user code writes it: kNN of the teacher (GEMM + topk), then the reference."""
    return token_graph_reference(student, teacher.detach(), k, GRAPH_SIGMA)


def graph_edges_eager(student, teacher, neighbours):
    """The edge work alone (neighbours given)."""
    return token_graph_reference(student, teacher.detach(), neighbours.shape[1], GRAPH_SIGMA, neighbours=neighbours)


def _graph_maker(m, ds, dt, k, device, dtype, with_neighbours):
    def make():
        gen = torch.Generator().manual_seed(0)
        student = torch.randn(m, ds, generator=gen).to(device, dtype).requires_grad_()
        teacher = torch.randn(m, dt, generator=gen).to(device, dtype)
        if with_neighbours:
            return student, teacher, knn_indices(teacher, k)
        return student, teacher

    return make


def graph_cases(device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    """Graph-loss cases, fwd + bwd: with the kNN selection ("graph") and with given neighbours."""
    out = []
    compiled, compiled_edges = torch.compile(graph_eager), torch.compile(graph_edges_eager)
    for dtype in dtypes:
        for m, ds, dt, k in GRAPH_QUICK_SHAPES if quick else GRAPH_SHAPES:
            shape = f"M={m} Ds={ds} Dt={dt} k={k}"
            out.append(Case("token_graph", "graph", shape, dtype, device,
                            _graph_maker(m, ds, dt, k, device, dtype, False), {
                                "kdloss": lambda s, t, k=k: token_graph_loss(s, t, k=k, sigma=GRAPH_SIGMA,
                                                                             backend="kernel"),
                                "eager": lambda s, t, k=k: graph_eager(s, t, k),
                                "compile": lambda s, t, k=k: compiled(s, t, k),
                            }))
            out.append(Case("token_graph", "graph-edges", shape, dtype, device,
                            _graph_maker(m, ds, dt, k, device, dtype, True), {
                                "kdloss": lambda s, t, nb: token_graph_loss(s, t, sigma=GRAPH_SIGMA, neighbours=nb,
                                                                            backend="kernel"),
                                "eager": graph_edges_eager,
                                "compile": compiled_edges,
                            }))
    return out
