"""Top-k sparse KL benchmark cases: kdloss kernel vs eager DistillKit-style code vs
torch.compile of it (Liger-Kernel has no sparse-teacher loss; its dense KL needs a GPU and a
dense [N, V] teacher).

Every case is forward + backward of the default variant (teacher renormalised over its k ids,
full-vocabulary student, T = 2, × T², mean over rows) on [N, V] student logits.
"""

from __future__ import annotations

import torch

from ..functional import topk_kl_loss
from . import Case

CPU_SHAPES = [(2048, 32000, 64), (8192, 32000, 64)]  # (N, V, k)
GPU_SHAPES = [(2048, 32000, 64), (16384, 151936, 64)]
QUICK_SHAPES = [(64, 4096, 16), (256, 8192, 32)]
TEMPERATURE = 2.0


def eager_distillkit(student_logits, teacher_ids, teacher_logprobs):
    """DistillKit's recipe in eager PyTorch: fp32 log-softmax of the whole student row, teacher
    power-transformed and renormalised over its ids, KL × T², mean over rows."""
    t = TEMPERATURE
    log_q = torch.log_softmax(student_logits.float() / t, dim=-1).gather(-1, teacher_ids)
    log_p = torch.log_softmax(teacher_logprobs.float() / t, dim=-1)
    rows = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (rows.mean() * t * t).to(student_logits.dtype)


def kernel(student_logits, teacher_ids, teacher_logprobs):
    return topk_kl_loss(student_logits, teacher_ids, teacher_logprobs, temperature=TEMPERATURE, backend="kernel")


def make_inputs(rows: int, vocab: int, k: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Student logits (leaf, ``dtype``), distinct teacher ids and fp32 full-softmax log-probs."""
    gen = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(rows, vocab, generator=gen)).to(device, dtype).requires_grad_()
    stride = vocab // k  # one id per stride-wide bucket: distinct within a row
    ids = torch.arange(k) * stride + torch.randint(0, stride, (rows, k), generator=gen)
    logprobs = torch.log_softmax(torch.randn(rows, k, generator=gen), -1) - 0.3
    return logits, ids.to(device), logprobs.to(device)


def cases(device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    shapes = QUICK_SHAPES if quick else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    compiled = torch.compile(eager_distillkit)
    out = []
    for dtype in dtypes:
        for rows, vocab, k in shapes:
            out.append(Case("topk_kl", "renorm T=2", f"N={rows} V={vocab} k={k}", dtype, device,
                            lambda r=rows, v=vocab, kk=k, d=dtype: make_inputs(r, v, kk, device, d),
                            {"kdloss": kernel, "eager": eager_distillkit, "compile": compiled}))
    return out
