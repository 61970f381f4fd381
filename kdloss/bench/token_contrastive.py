"""Token-contrastive (TRG global InfoNCE) benchmark cases: kdloss kernel (column strips with an online
log-sum-exp, no M × M matrix) vs the eager formula (normalise, one similarity GEMM, cross-entropy over
the [M, M] logits) vs torch.compile(eager). Both sides receive a gradient (TRG trains the teacher-side
projection head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..testing.token_contrastive import build
from ..token_contrastive import token_contrastive_loss
from . import Case, fuzz_case_inputs

# (M, E): 16 images × 64 sampled tokens projected to 256; 4096 nodes of width 768; 8192 nodes of width
# 128 (where the eager [M, M] logits dominate memory)
SHAPES = [(1024, 256), (4096, 768), (8192, 128)]
QUICK_SHAPES = [(64, 32), (300, 64)]
TEMPERATURE = 0.1


def eager(student, teacher):
    """The loss as user code writes it: cosine logits over all node pairs, cross-entropy on the diagonal."""
    logits = F.normalize(student, dim=-1) @ F.normalize(teacher, dim=-1).T / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(student.shape[0], device=student.device))


def _maker(m, dim, device, dtype):
    case = {"nodes": m, "dim": dim, "temperature": TEMPERATURE, "similarity": "cosine", "symmetric": False,
            "detach_teacher": False, "reduction": "mean", "layout": "contiguous", "magnitude": 1.0, "seed": 0}
    return fuzz_case_inputs(build, case, device, dtype, constants=())


def cases(device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    """Contrastive-loss cases, forward + backward into both sides."""
    out = []
    compiled = torch.compile(eager)
    for dtype in dtypes:
        for m, dim in QUICK_SHAPES if quick else SHAPES:
            out.append(Case("token_contrastive", "contrastive", f"M={m} E={dim}", dtype, device,
                            _maker(m, dim, device, dtype), {
                                "kdloss": lambda s, t: token_contrastive_loss(s, t, temperature=TEMPERATURE,
                                                                              backend="kernel"),
                                "eager": eager,
                                "compile": compiled,
                            }))
    return out
