"""Fused linear head + top-k KL cases for the fuzzer and property tests.

A case: ``rows`` (0 allowed), ``hidden`` width H, ``vocab``, ``k``, ``pad``, the top-k variant
(``values``/``tail``/``support``), ``temperature``, ``teacher_temperature``, ``scale_by_t2``, ``labels``
(None | "some" | "all" ignored), ``num_items``, ``reduction``, ``bias`` (with an LM-head bias),
``softcap`` (None or a Gemma-style cap), ``chunk_size`` (small, so several chunks run), ``magnitude`` of
the hidden states and ``seed``. The teacher side is drawn as for ``topk_kl``.
"""

from __future__ import annotations

import torch

from ..fused_linear_topk_kl import fused_linear_topk_kl_loss
from ..reference.fused_linear_topk_kl import fused_linear_topk_kl_reference
from . import Built, Example, LossSpec, register
from .topk_kl import EXTREME_T, REDUCTIONS, VARIANTS, _teacher, draw_labels, kl_term_scale


def strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        vocab = draw(st.integers(1, 400))
        k = draw(st.integers(1, min(vocab, 32)))
        values, tail, support = draw(st.sampled_from(VARIANTS))
        reduction = draw(st.sampled_from(REDUCTIONS))
        return {
            "rows": draw(st.one_of(st.just(0), st.integers(1, 24))),
            "hidden": draw(st.integers(1, 48)),
            "vocab": vocab,
            "k": k,
            "pad": draw(st.integers(0, min(k - 1, 3))) if k > 1 else 0,
            "values": values,
            "tail": tail,
            "support": support,
            "temperature": draw(st.one_of(st.sampled_from([1.0, 0.5, 2.0]), st.sampled_from(EXTREME_T))),
            "teacher_temperature": draw(st.sampled_from([1.0, 1.5])),
            "scale_by_t2": draw(st.booleans()),
            "labels": draw(st.sampled_from([None, "some", "all"])),
            "num_items": draw(st.sampled_from([None, 0, 7])) if reduction == "mean" else None,
            "reduction": reduction,
            "bias": draw(st.booleans()),
            "softcap": draw(st.sampled_from([None, None, 5.0, 30.0])),
            "chunk_size": draw(st.sampled_from([None, 1, 5, 16])),
            "magnitude": draw(st.sampled_from([0.3, 1.0, 3.0])),
            "quantised": False,
            "seed": draw(st.integers(0, 2**31 - 1)),
        }

    return cases()


def build(case: dict, device: torch.device, dtype: torch.dtype) -> Built:
    gen = torch.Generator().manual_seed(case["seed"])
    rows, vocab, width = case["rows"], case["vocab"], case["hidden"]
    hidden = case["magnitude"] * torch.randn(rows, width, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64) / width**0.5
    bias = 0.5 * torch.randn(vocab, generator=gen, dtype=torch.float64)
    ids, values = _teacher(case, gen, rows, vocab)
    labels = draw_labels(case, gen, rows, vocab)
    labels = None if labels is None else labels.to(device)
    leaves = [hidden, weight] + ([bias] if case["bias"] else [])
    inputs = tuple(t.to(device, dtype).requires_grad_() for t in leaves)
    teacher_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    constants = {"teacher_ids": ids.to(device), "teacher_values": values.to(device, teacher_dtype), "labels": labels}
    return Built(inputs, constants, upstream_seed=case["seed"] + 1)


def options(case: dict) -> dict:
    """Keyword arguments of ``fused_linear_topk_kl_loss`` for a case (``chunk_size`` added by ``kernel``)."""
    return dict(
        values=case["values"], tail=case["tail"], student_support=case["support"],
        temperature=case["temperature"], teacher_temperature=case["teacher_temperature"],
        scale_by_t2=case["scale_by_t2"], reduction=case["reduction"], num_items_in_batch=case["num_items"],
        softcap=case["softcap"],
    )


def kernel(case, hidden, weight, bias=None, *, teacher_ids, teacher_values, labels):
    return fused_linear_topk_kl_loss(hidden, weight, teacher_ids, teacher_values, labels, bias=bias,
                                     chunk_size=case["chunk_size"], backend="kernel", **options(case))


def reference(case, hidden, weight, bias=None, *, teacher_ids, teacher_values, labels):
    return fused_linear_topk_kl_reference(hidden, weight, teacher_ids, teacher_values, labels, bias=bias,
                                          **options(case))


#: Eager user code: the unfused head in the input dtype, then the loss (the reference upcasts the logits).
naive = reference

def example(device, dtype) -> Example:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(30, 8, generator=gen, dtype=torch.float64) / 3
    top = torch.randn(6, 30, generator=gen, dtype=torch.float64).log_softmax(-1).topk(4)
    labels = torch.tensor([1, -100, 3, 4, 5, 6])
    args = (hidden.to(device, dtype), weight.to(device, dtype), top.indices.to(device),
            top.values.to(device, dtype), labels.to(device))
    return Example(args, {"temperature": 2.0, "chunk_size": 4}, (0, 1))


def value_scale(case, hidden, weight, bias=None, *, teacher_ids, teacher_values, labels):
    from ..reference.fused_linear_topk_kl import linear_logits

    logits = linear_logits(hidden, weight, bias, case["softcap"])
    return kl_term_scale(logits, teacher_ids, teacher_values, labels,
                         {k: v for k, v in options(case).items() if k != "softcap"})


SPEC = register(LossSpec("fused_linear_topk_kl", strategy, build, kernel, reference, naive, example,
                         value_scale=value_scale))
