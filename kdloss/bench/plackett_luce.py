"""PLD benchmark cases: kdloss kernel vs the paper's eager code (App. C: ascending argsort, label
moved last, prefix logcumsumexp) vs torch.compile of that code, at N = 1024 rows and C ∈ {100, 1000,
32000} (CIFAR-100, ImageNet, an LLM-sized vocabulary)."""

from __future__ import annotations

import torch

from ..functional import plackett_luce_loss
from ..testing.plackett_luce import build
from . import Case, fuzz_case_inputs

SHAPES = [(1024, 100), (1024, 1000), (1024, 32000)]
QUICK_SHAPES = [(64, 100), (256, 100)]


def pld_paper_eager(student, teacher, labels, temperature: float = 1.0):
    """The PLD paper's App. C formulation in eager PyTorch (unstable ascending sort, as published)."""
    rows, classes = student.shape
    ascending = torch.argsort(teacher, dim=-1)
    rest = ascending[ascending != labels[:, None]].view(rows, classes - 1)
    perm = torch.cat([rest, labels[:, None]], dim=1)
    s_perm = student.gather(1, perm)
    weights = torch.softmax(teacher.gather(1, perm) / temperature, dim=-1)
    return (weights * (torch.logcumsumexp(s_perm, dim=-1) - s_perm)).sum(-1).mean()


def _maker(rows: int, classes: int, device: str, dtype: torch.dtype):
    case = {"lead": [rows], "classes": classes, "ties": False, "ignore": 0.0, "permutation": False,
            "temperature": 1.0, "reduction": "mean", "layout": "contiguous", "magnitude": 3.0, "seed": 0}
    return fuzz_case_inputs(build, case, device, dtype, ("teacher", "labels"))


def cases(device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    out = []
    compiled = torch.compile(pld_paper_eager)
    for dtype in dtypes:
        for rows, classes in QUICK_SHAPES if quick else SHAPES:
            out.append(Case("plackett_luce", "logits", f"N={rows} C={classes}", dtype, device,
                            _maker(rows, classes, device, dtype), {
                                "kdloss": lambda s, t, y: plackett_luce_loss(s, t, y, backend="kernel"),
                                "eager": pld_paper_eager,
                                "compile": compiled,
                            }))
    return out
