"""Top-k sparse KL cases for the fuzzer, property tests and benchmarks.

A case: ``rows`` (0 allowed), ``split`` (rows as ``[2, rows/2]`` leading dims when even), ``vocab``
(small, or above the kernel's 2048-element LSE block so the running max is rescaled), ``k``,
``pad`` (trailing teacher slots with value −inf and a repeated id), ``values``/``tail``/
``support`` (the variants), ``temperature``, ``teacher_temperature``, ``scale_by_t2``, ``labels``
(None | "some" ignored | "all" ignored), ``num_items`` (None | an int, only with "mean"),
``reduction``, ``layout`` ("contiguous" | "rows": a row-strided slice | "strided": vocabulary not
unit-stride), ``magnitude`` of the logits, ``confident`` (the logit of one kept id raised 40 above the
rest: a student certain of one token, whose mass outside the ids is below fp32 resolution),
``student_pad`` (vocabulary entries at −inf in the student, never kept by the teacher), ``quantised``
(stored log-probs shifted up so their mass may exceed 1) and ``seed``. Temperatures include the
extremes 1e-6 and 1e3 (logits/T up to ~1e8: every log-probability must be formed from differences
of logits, not from the scaled logits).
"""

from __future__ import annotations

import torch

from ..functional import topk_kl_loss
from ..reference.topk_kl import topk_kl_reference
from . import Built, Example, LossSpec, non_contiguous, register

REDUCTIONS = ("mean", "sum", "none")
#: Temperatures at the edges of the valid range that a typical strategy would never draw.
EXTREME_T = (1e-6, 1e-3, 30.0, 1e3)
VARIANTS = (  # (values, tail, student_support)
    ("logprobs", "renorm", "full"),
    ("logprobs", "bucket", "full"),
    ("logprobs", "none", "full"),
    ("logprobs", "renorm", "topk"),
    ("logprobs", "none", "topk"),
    ("logits", "renorm", "full"),
    ("logits", "renorm", "topk"),
)


def strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        large = draw(st.booleans())
        vocab = draw(st.integers(2049, 4500)) if large else draw(st.integers(1, 300))
        student_pad = draw(st.sampled_from([0, 0, 3])) if vocab > 8 else 0
        k = draw(st.integers(1, min(vocab - student_pad, 48)))
        values, tail, support = draw(st.sampled_from(VARIANTS))
        reduction = draw(st.sampled_from(REDUCTIONS))
        return {
            "rows": draw(st.one_of(st.just(0), st.just(1), st.integers(1, 8 if large else 40))),
            "split": draw(st.booleans()),
            "vocab": vocab,
            "k": k,
            "pad": draw(st.integers(0, min(k - 1, 4))) if k > 1 else 0,
            "values": values,
            "tail": tail,
            "support": support,
            "temperature": draw(st.one_of(st.sampled_from([1.0, 0.5, 2.0, 3.7]), st.sampled_from(EXTREME_T))),
            "teacher_temperature": draw(st.sampled_from([1.0, 1.5])),
            "scale_by_t2": draw(st.booleans()),
            "labels": draw(st.sampled_from([None, "some", "all"])),
            "num_items": draw(st.sampled_from([None, 0, 7])) if reduction == "mean" else None,
            "reduction": reduction,
            "layout": draw(st.sampled_from(["contiguous", "rows", "strided"])),
            "magnitude": draw(st.sampled_from([0.1, 1.0, 8.0, 60.0])),
            "confident": draw(st.booleans()),
            "student_pad": student_pad,
            "quantised": draw(st.booleans()) and values == "logprobs",
            "seed": draw(st.integers(0, 2**31 - 1)),
            "shifted": draw(st.booleans()),
            "precompute_grad": draw(st.sampled_from([None, False])),
        }

    return cases()


def _lead(case: dict) -> tuple[int, ...]:
    rows = case["rows"]
    return (2, rows // 2) if case["split"] and rows % 2 == 0 and rows > 0 else (rows,)


def _teacher(case: dict, gen: torch.Generator, rows: int, usable: int):
    """Teacher ids ``[rows, k]`` (distinct among slots with mass) and values, fp64."""
    k, pad = case["k"], case["pad"]
    teacher_logits = 3.0 * torch.randn(rows, usable, generator=gen, dtype=torch.float64)
    order = torch.rand(rows, usable, generator=gen).argsort(dim=-1)
    ids = order[:, :k].clone()
    picked = teacher_logits.gather(1, ids)
    if case["values"] == "logits":
        values = picked
    else:
        values = picked - torch.logsumexp(teacher_logits, dim=-1, keepdim=True)
        if case["quantised"]:
            values = values + 0.05
    if pad:
        values[:, k - pad:] = float("-inf")
        ids[:, k - pad:] = ids[:, :1]  # a repeated id carrying no mass is allowed
    return ids, values


def draw_labels(case: dict, gen: torch.Generator, rows: int, vocab: int) -> torch.Tensor | None:
    """``[rows]`` labels in ``[0, vocab)`` with some (``case["labels"] == "some"``, ~30 %) or all ("all")
    set to -100; None when ``case["labels"]`` is None."""
    if case["labels"] is None:
        return None
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    some = case["labels"] == "some"
    ignored = torch.rand(rows, generator=gen) < 0.3 if some else torch.ones(rows, dtype=torch.bool)
    labels[ignored] = -100
    return labels


def build(case: dict, device: torch.device, dtype: torch.dtype) -> Built:
    gen = torch.Generator().manual_seed(case["seed"])
    rows, vocab = case["rows"], case["vocab"]
    lead = _lead(case)
    usable = vocab - case["student_pad"]
    logits = case["magnitude"] * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    if case["student_pad"]:
        logits[:, usable:] = float("-inf")
    ids, values = _teacher(case, gen, rows, usable)
    if case.get("confident") and rows:
        logits.scatter_add_(1, ids[:, :1], torch.full((rows, 1), 40.0, dtype=torch.float64))
    labels = draw_labels(case, gen, rows, vocab)
    labels = None if labels is None else labels.reshape(lead).to(device)
    logits = logits.to(device, dtype)
    if case["layout"] == "rows":
        wide = torch.zeros(rows, vocab + 5, dtype=dtype, device=device)
        wide[:, 2:vocab + 2] = logits
        student = wide[:, 2:vocab + 2].detach().requires_grad_()
    elif case["layout"] == "strided":
        student = non_contiguous(logits).requires_grad_()
    else:
        student = logits.requires_grad_()
    teacher_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    constants = {
        "teacher_ids": ids.reshape(*lead, case["k"]).to(device),
        "teacher_values": values.reshape(*lead, case["k"]).to(device, teacher_dtype),
        "labels": labels,
    }
    return Built((student,), constants, upstream_seed=case["seed"] + 1)


def options(case: dict) -> dict:
    """Keyword arguments of ``topk_kl_loss`` for a case."""
    return dict(
        values=case["values"], tail=case["tail"], student_support=case["support"],
        temperature=case["temperature"], teacher_temperature=case["teacher_temperature"],
        scale_by_t2=case["scale_by_t2"], reduction=case["reduction"], num_items_in_batch=case["num_items"],
    )


def _view(case: dict, student: torch.Tensor) -> torch.Tensor:
    return student.reshape(*_lead(case), case["vocab"])


def _kernel_view(case: dict, student: torch.Tensor) -> torch.Tensor:
    """As :func:`_view`; for ``shifted`` cases with two leading dims, the same values read as the label-shift
    slice ``full[:, :-1]`` of a ``[B, T + 1, V]`` tensor (rows with a batch stride of T + 1 rows)."""
    view = _view(case, student)
    if not case.get("shifted") or view.dim() != 3:
        return view
    return torch.cat([view, view[:, :1]], dim=1)[:, :-1]


def kernel(case, student, *, teacher_ids, teacher_values, labels):
    return topk_kl_loss(_kernel_view(case, student), teacher_ids, teacher_values, labels, backend="kernel",
                        precompute_grad=case.get("precompute_grad"), **options(case))


def reference(case, student, *, teacher_ids, teacher_values, labels):
    return topk_kl_reference(_view(case, student), teacher_ids, teacher_values, labels, **options(case))


def naive(case, student, *, teacher_ids, teacher_values, labels):
    """Eager code as DistillKit runs it: the student upcast to fp32 for the log-softmax."""
    return topk_kl_reference(_view(case, student), teacher_ids, teacher_values, labels, **options(case))


def kl_term_scale(logits, teacher_ids, teacher_values, labels, options: dict) -> float:
    """The magnitude of the terms the top-k KL value sums (fp64): per counted row
    ``c·Σ_K p̂ (|log p̂| + |log q|)`` (+ the tail bucket's ``r̂ (|log r̂| + |log r_s|)``, with
    ``|log r_s| ≤ |log 1e-8| < 20`` by the clamp), ``c = T²`` or 1,
    reduced like the loss (the max over rows for ``"none"``). Every fp32 log-probability carries an
    absolute rounding error ~eps·|log|, so any fp32 evaluation of the loss — the kernel's or eager
    code's — errs by up to ~eps times this, however small the KL itself (p̂ ≈ q at a large T)."""
    from .._topk import TopKKLOptions, log_targets

    kwargs = {k: v for k, v in options.items() if k != "num_items_in_batch"}
    opts = TopKKLOptions(**kwargs)
    vocab, k = logits.shape[-1], teacher_ids.shape[-1]
    z = logits.reshape(-1, vocab)
    ids = teacher_ids.reshape(-1, k).long()
    log_p, log_r = log_targets(teacher_values.reshape(-1, k).double(), opts)
    kept = ~torch.isneginf(log_p)
    zt = (z - z.amax(1, keepdim=True)) / opts.temperature
    if opts.student_support == "full":
        log_q = (zt - torch.logsumexp(zt, 1, keepdim=True)).gather(1, ids)
    else:
        zk = zt.gather(1, ids).masked_fill(~kept, float("-inf"))
        log_q = zk - torch.logsumexp(zk, 1, keepdim=True)
    p = log_p.exp()
    terms = torch.where(kept, p * (log_p.abs() + log_q.abs()), torch.zeros_like(p)).sum(1)
    has_tail = ~torch.isneginf(log_r)
    tail = torch.where(has_tail, log_r.exp() * (log_r.abs().nan_to_num(0.0) + 20.0), torch.zeros_like(log_r))
    rows = (terms + tail) * opts.scale
    counted = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels.reshape(-1) != opts.ignore_index
    rows = torch.where(counted, rows, torch.zeros_like(rows))
    if rows.numel() == 0:
        return 0.0
    if opts.reduction == "none":
        return rows.max().item()
    if opts.reduction == "sum":
        return rows.sum().item()
    num_items = options.get("num_items_in_batch")
    divisor = int(counted.sum()) if num_items is None else float(num_items)
    return rows.sum().item() / divisor if divisor > 0 else 0.0


def value_scale(case, student, *, teacher_ids, teacher_values, labels):
    return kl_term_scale(_view(case, student), teacher_ids, teacher_values, labels, options(case))


def example(device, dtype) -> Example:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 40, generator=gen, dtype=torch.float64)
    top = torch.randn(2, 3, 40, generator=gen, dtype=torch.float64).log_softmax(-1).topk(5)
    labels = torch.tensor([[1, -100, 3], [4, 5, -100]])
    args = (logits.to(device, dtype), top.indices.to(device), top.values.to(device, dtype), labels.to(device))
    return Example(args, {"temperature": 2.0, "tail": "bucket"})


SPEC = register(LossSpec("topk_kl", strategy, build, kernel, reference, naive, example, value_scale=value_scale))
