"""SinKD benchmark cases: kdloss kernel vs the official code's eager multiplicative recursion vs
torch.compile of it, at GLUE-like (B=32, C=2) up to large (B=1024, C=100) batches; B' = B.

The issue-18 targets are the rows B=32 C=2, B=256 C=10 and B=1024 C=100:
``python -m kdloss.bench --loss sinkhorn --dtype float32 --threads 2``."""

from __future__ import annotations

import torch

from ..functional import sinkhorn_loss
from ..testing.sinkhorn import build
from . import Case, fuzz_case_inputs

SHAPES = [(32, 2), (32, 100), (256, 2), (256, 10), (256, 100), (1024, 2), (1024, 100)]  # (B, C)
QUICK_SHAPES = [(32, 2), (128, 10)]


def eager_official(zs, zt):
    """The official SinKD forward in eager PyTorch: ~60 small ops, autograd through them.
    CPU ``torch.cdist`` has no bf16/fp16 kernel; there the L1 cost is formed by broadcasting."""
    p_s = torch.softmax(zs / 2.0, dim=1)
    p_t = torch.softmax(zt / 2.0, dim=1)
    if p_s.dtype in (torch.float32, torch.float64) or p_s.is_cuda:
        cost = torch.cdist(p_s, p_t, p=1)
    else:
        cost = (p_s[:, None, :] - p_t[None, :, :]).abs().sum(-1)
    plan = torch.exp(-cost / 0.1)
    for _ in range(20):
        plan = plan / plan.sum(1, keepdim=True)
        plan = plan / plan.sum(0, keepdim=True)
    return (plan * cost).sum()


def _maker(batch: int, classes: int, device: str, dtype: torch.dtype):
    case = {"batch": batch, "batch_t": batch, "classes": classes, "temperature": 2.0, "epsilon": 0.1,
            "n_iters": 20, "scale": 1.0, "layout": "contiguous", "magnitude": 1.0, "seed": 0}
    return fuzz_case_inputs(build, case, device, dtype)


def cases(device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    out = []
    compiled = torch.compile(eager_official)
    for dtype in dtypes:
        for batch, classes in QUICK_SHAPES if quick else SHAPES:
            out.append(Case("sinkhorn", "logits", f"B={batch} C={classes}", dtype, device,
                            _maker(batch, classes, device, dtype), {
                                "kdloss": lambda zs, zt: sinkhorn_loss(zs, zt, backend="kernel"),
                                "eager": eager_official,
                                "compile": compiled,
                            }))
    return out
