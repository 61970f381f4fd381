"""Margin-MSE benchmark cases: kdloss kernel vs eager (sentence-transformers' formula) vs
torch.compile(eager) vs sentence-transformers itself (when installed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..functional import margin_mse_from_embeddings, margin_mse_loss
from ..testing.margin_mse import build
from . import Case, fuzz_case_inputs

# (B, n) for scores; (B, n, D) for embeddings — ST triplets, MS MARCO-style multi-negative batches
SCORE_SHAPES = [(64, 1), (1024, 32), (16384, 64)]
EMB_SHAPES = [(64, 1, 768), (256, 8, 768), (1024, 16, 1024)]
QUICK_SCORE_SHAPES = [(64, 1), (1024, 32)]
QUICK_EMB_SHAPES = [(64, 1, 768), (256, 8, 256)]


def eager_scores(pos, neg, teacher):
    """sentence-transformers' formula on precomputed scores: MSELoss over [B, n] margins."""
    return F.mse_loss(pos[:, None] - neg, teacher[:, :1] - teacher[:, 1:])


def eager_embeddings(q, p, negs, teacher):
    """sentence-transformers' bi-encoder path with pairwise_dot_score, written out."""
    s_pos = (q * p).sum(-1)
    margins = torch.stack([s_pos - (q * negs[:, i]).sum(-1) for i in range(negs.shape[1])], 1)
    return F.mse_loss(margins, teacher[:, :1] - teacher[:, 1:])


def _sentence_transformers_impl():
    try:
        from sentence_transformers.sentence_transformer.losses import MarginMSELoss
    except Exception:
        return None
    loss = MarginMSELoss(torch.nn.Module())

    def run(q, p, negs, teacher):
        return loss.compute_loss_from_embeddings([q, p, *negs.unbind(1)], teacher)

    return run


def _maker(kind: str, batch: int, n_neg: int, dim: int, device: str, dtype: torch.dtype):
    """Inputs from the shared generator (kdloss.testing.margin_mse), raw teacher scores."""
    case = {"kind": kind, "batch": batch, "n_neg": n_neg, "dim": dim, "teacher": "scores",
            "reduction": "mean", "layout": "contiguous", "magnitude": 1.0, "seed": 0}
    return fuzz_case_inputs(build, case, device, dtype)


def cases(device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    out = []
    compiled_scores = torch.compile(eager_scores)
    compiled_emb = torch.compile(eager_embeddings)
    st_impl = _sentence_transformers_impl()
    for dtype in dtypes:
        for batch, n in QUICK_SCORE_SHAPES if quick else SCORE_SHAPES:
            make = _maker("scores", batch, n, 1, device, dtype)
            out.append(Case("margin_mse", "scores", f"B={batch} n={n}", dtype, device, make, {
                "kdloss": lambda p, ng, t: margin_mse_loss(p, ng, t, backend="kernel"),
                "eager": eager_scores,
                "compile": compiled_scores,
            }))
        for batch, n, dim in QUICK_EMB_SHAPES if quick else EMB_SHAPES:
            make = _maker("embeddings", batch, n, dim, device, dtype)
            impls = {
                "kdloss": lambda q, p, ng, t: margin_mse_from_embeddings(q, p, ng, t, backend="kernel"),
                "eager": eager_embeddings,
                "compile": compiled_emb,
            }
            if st_impl is not None:
                impls["sentence-transformers"] = st_impl
            out.append(Case("margin_mse", "embeddings", f"B={batch} n={n} D={dim}", dtype, device, make, impls))
    return out
