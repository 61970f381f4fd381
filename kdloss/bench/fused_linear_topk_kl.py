"""Fused linear head + top-k KL benchmark cases: kdloss fused vs kdloss unfused (``hidden @ Wᵀ``
then ``topk_kl_loss``) vs eager DistillKit-style code vs torch.compile of it, forward + backward
with gradients for hidden and weight, and peak memory."""

from __future__ import annotations

import torch

from ..functional import fused_linear_topk_kl_loss, topk_kl_loss
from . import Case
from .topk_kl import TEMPERATURE, eager_distillkit

CPU_SHAPES = [(1024, 1024, 32000, 64), (4096, 256, 32000, 64)]  # (N, H, V, k); the 2nd: logits ≫ weight
GPU_SHAPES = [(8192, 4096, 151936, 64)]
QUICK_SHAPES = [(64, 64, 2048, 16), (256, 64, 8192, 16)]


def fused(hidden, weight, ids, logprobs):
    return fused_linear_topk_kl_loss(hidden, weight, ids, logprobs, temperature=TEMPERATURE, backend="kernel")


def unfused(hidden, weight, ids, logprobs):
    return topk_kl_loss(hidden @ weight.T, ids, logprobs, temperature=TEMPERATURE, backend="kernel")


def eager(hidden, weight, ids, logprobs):
    return eager_distillkit(hidden @ weight.T, ids, logprobs)


def make_inputs(rows: int, hidden: int, vocab: int, k: int, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, dtype).requires_grad_()
    stride = vocab // k
    ids = torch.arange(k) * stride + torch.randint(0, stride, (rows, k), generator=gen)
    logprobs = torch.log_softmax(torch.randn(rows, k, generator=gen), -1) - 0.3
    return h, w, ids.to(device), logprobs.to(device)


def cases(device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    shapes = QUICK_SHAPES if quick else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    compiled = torch.compile(eager)
    out = []
    for dtype in dtypes:
        for rows, hidden, vocab, k in shapes:
            out.append(Case("fused_linear_topk_kl", "renorm T=2", f"N={rows} H={hidden} V={vocab} k={k}", dtype,
                            device,
                            lambda r=rows, h=hidden, v=vocab, kk=k, d=dtype: make_inputs(r, h, v, kk, device, d),
                            {"kdloss": fused, "kdloss-unfused": unfused, "eager": eager, "compile": compiled}))
    return out
