"""Fused linear head + top-k KL cases for the fuzzer and property tests.

A case: ``rows`` (0 allowed), ``hidden`` width H, ``vocab``, ``k``, ``pad``, the top-k variant
(``values``/``tail``/``support``), ``temperature``, ``teacher_temperature``, ``scale_by_t2``, ``labels``
(None | "some" | "all" ignored), ``num_items``, ``reduction``, ``bias`` (with an LM-head bias),
``softcap`` (None or a Gemma-style cap), ``chunk_size`` (small, so several chunks run), ``magnitude`` of
the hidden states and ``seed``. The teacher side is drawn as for ``topk_kl``.
"""

from __future__ import annotations

import torch

from .._autocast import no_autocast
from ..fused_linear_topk_kl import FusedLinearTopKKLOptions, fused_linear_topk_kl_loss
from ..reference.fused_linear_topk_kl import fused_linear_topk_kl_reference
from ..reference.topk_kl import topk_kl_reference
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


def _head_loss(case, logits_of, hidden, weight, bias, teacher_ids, teacher_values, labels):
    """The reference loss of a head whose logits ``logits_of(hidden, weight, bias, options)`` forms: rows
    that do not count zeroed first (as the reference: they never reach the weight gradient), then the
    top-k loss in fp64."""
    keywords = {k: v for k, v in options(case).items() if k != "num_items_in_batch"}
    opts = FusedLinearTopKKLOptions(chunk_size=case["chunk_size"], **keywords)
    if labels is not None:
        hidden = torch.where((labels != opts.ignore_index).unsqueeze(-1), hidden, torch.zeros_like(hidden))
    with no_autocast(hidden.device.type):
        logits = logits_of(hidden, weight, bias, opts)
    return topk_kl_reference(logits, teacher_ids, teacher_values, labels, options=opts,
                             num_items_in_batch=case["num_items"])


def _chunked_naive(by_vocab: bool):
    """Eager user code with a chunked head, as Liger-style heads compute it: the logits of each chunk of
    the kernel's rows per chunk, as ``h_c·Wᵀ`` or (``by_vocab``) as ``(W·h_cᵀ)ᵀ``, then the loss in
    fp64. The rounding of a logit depends on the GEMM's order, and at an extreme temperature the loss
    amplifies it by up to 1/T²: each order is as legitimate as the unchunked one."""

    def logits_of(hidden, weight, bias, opts):
        rows = max(opts.rows_per_chunk(weight.shape[0], weight.dtype, hidden.device), 1)
        parts = []
        for start in range(0, max(hidden.shape[0], 1), rows):  # no rows: one empty chunk
            chunk = hidden[start:start + rows].to(weight.dtype)
            if by_vocab:
                product = torch.mm(weight, chunk.T) if bias is None else torch.addmm(bias[:, None], weight, chunk.T)
                parts.append(product.T)
            else:
                parts.append(torch.nn.functional.linear(chunk, weight, bias))
        logits = torch.cat(parts)
        return logits if opts.softcap is None else opts.softcap * torch.tanh(logits / opts.softcap)

    def chunked(case, hidden, weight, bias=None, *, teacher_ids, teacher_values, labels):
        return _head_loss(case, logits_of, hidden, weight, bias, teacher_ids, teacher_values, labels)

    return chunked


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


def rounded_exact(case, hidden, weight, bias=None, *, dtype, teacher_ids, teacher_values, labels):
    """The fp64 loss of the logits as the head rounds them to ``dtype`` (the weight's, as ``nn.Linear``
    rounds them), differentiated in fp64: at T = 1e-6 two float16 logits within a rounding of each other
    may swap places, and with them which id carries a gradient of ~1/T."""
    from ..reference.fused_linear_topk_kl import linear_logits

    def logits_of(hidden, weight, bias, opts):
        bias_low = None if bias is None else bias.to(dtype)
        with torch.no_grad():
            rounded = linear_logits(hidden.to(dtype), weight.to(dtype), bias_low, opts.softcap).double()
        exact = linear_logits(hidden, weight, bias, opts.softcap)
        return exact + (rounded - exact).detach()  # the rounded values, with the exact logits' gradient

    return _head_loss(case, logits_of, hidden, weight, bias, teacher_ids, teacher_values, labels)


SPEC = register(LossSpec("fused_linear_topk_kl", strategy, build, kernel, reference, naive, example,
                         value_scale=value_scale, naive_variants=(_chunked_naive(False), _chunked_naive(True)),
                         rounded_exact=rounded_exact))
