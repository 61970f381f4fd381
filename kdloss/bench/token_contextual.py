"""Token-contextual benchmark cases: kdloss kernel (symmetric half products, one gradient GEMM, no
[B, N, N] tensor kept) vs the eager formula (two batched GEMMs, two softmaxes, MSELoss) vs
torch.compile(eager). Reproduce the B=16 N=197 D=384 row with
``python -m kdloss.bench --loss token_contextual --dtype float32 --threads 2``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..testing.token_contextual import build
from ..token_contextual import token_contextual_loss
from . import Case, fuzz_case_inputs

# (B, N, D): ViT-S/16 at 224² (197 tokens, width 384); a long-sequence case (1024 tokens, width 768)
SHAPES = [(16, 197, 384), (4, 1024, 768)]
QUICK_SHAPES = [(2, 64, 64), (4, 128, 64)]


def eager(student, teacher):
    """The loss as user code writes it: per-image softmax(F·Fᵀ/√D), then nn.MSELoss."""
    def context(x):
        return torch.softmax(x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1]), dim=-1)

    return F.mse_loss(context(student), context(teacher.detach()))


def _maker(batch, n, dim, device, dtype):
    case = {"batch": batch, "tokens": n, "ds": dim, "dt": dim, "reduction": "mean", "layout": "contiguous",
            "magnitude": 1.0, "seed": 0}
    return fuzz_case_inputs(build, case, device, dtype)


def cases(device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    """Contextual-loss cases, forward + backward."""
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
    return out
