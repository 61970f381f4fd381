"""Top-k sparse KL over a large vocabulary: readable pure-PyTorch reference.

Per row (position) with student logits ``z ∈ R^V``, kept teacher ids ``K`` and teacher values on
``K``:

* teacher target ``p̂`` on ``K`` (+ an optional tail bucket ``r̂``) from :func:`teacher_log_targets`
  (power transform ``p^a``, ``a = teacher_temperature / temperature``);
* student ``log q = log_softmax(z / T)`` over the full vocabulary (or over ``K`` only with
  ``student_support="topk"``);
* ``KL_row = Σ_K p̂ (log p̂ − log q) [+ r̂ (log r̂ − log r_s)]`` with xlogy semantics (slots of zero
  teacher mass contribute nothing, and are not part of ``K``), ``r_s = 1 − Σ_K q`` (summed over the
  ids outside K, so that it keeps its digits when ``Σ_K q`` is close to 1) clamped as DistillKit does
  (``Σ_K q`` to ``[1e-8, 1 − 1e-8]``, i.e. ``r_s`` to ``[1e-8, 1 − 1e-8]``: a student confident on ``K``
  gives ``log r_s = log 1e-8``, not DistillKit's fp32 −inf);
* ``loss = T² · Σ_{counted rows} KL_row / num_items`` (``T²`` only with ``scale_by_t2``).

Logits are shifted by their maximum before they are divided by ``T`` (and teacher log-values before
they are multiplied by the power ``a``): at small ``T`` the scaled values are huge, and their
rounding would cost the absolute accuracy of every log-probability. Everything here materialises
``[N, V]`` fp32/fp64 tensors: it is the ground truth of the kernel tests and the fallback, not the
fast path.
"""

from __future__ import annotations

import math

import torch

from .._autocast import cast_loss
from .._topk import TopKKLOptions
from .._validation import accumulation_dtype, comparable

__all__ = ["TAIL_CLAMP", "reduce_rows", "teacher_log_targets", "topk_kl_reference"]

NEG_INF = float("-inf")
#: DistillKit's clamp of the student's kept mass in the tail-bucket term.
TAIL_CLAMP = 1e-8


def _powered_log_normalize(log_w: torch.Tensor, power: float, extra: torch.Tensor | None = None):
    """``a·log_w − logsumexp(a·log_w [, a·extra])`` along the last dim (``extra [...]`` is one more
    outcome), keeping −inf slots at −inf; a row with no mass at all stays −inf, never NaN.

    The values are shifted by the row maximum before the multiplication by ``a``, so a huge power
    (a tiny distillation temperature) gives the one-hot limit instead of −inf − (−inf)."""
    parts = log_w if extra is None else torch.cat([log_w, extra.unsqueeze(-1)], dim=-1)
    top = parts.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    shifted = torch.where(torch.isneginf(parts), parts, (parts - top) * power)
    log_z = torch.logsumexp(shifted, dim=-1, keepdim=True)
    log_z = torch.where(torch.isneginf(log_z), torch.zeros_like(log_z), log_z)
    out = torch.where(torch.isneginf(shifted), shifted, shifted - log_z)
    if extra is None:
        return out, None
    return out[..., :-1], out[..., -1]


def teacher_log_targets(
    teacher_values: torch.Tensor,
    *,
    values: str = "logprobs",
    tail: str = "renorm",
    power: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-targets ``log p̂`` on the kept ids and the tail bucket ``log r̂``.

    Args:
        teacher_values: ``[..., k]`` stored log-probs (``values="logprobs"``) or logits
            (``values="logits"``); −inf means probability 0. Computed in fp32 (fp64 for fp64).
        values: ``"logprobs"`` or ``"logits"``.
        tail: ``"renorm"`` (``p̂ ∝ p^a`` over K), ``"bucket"`` (``(k+1)``-outcome distribution with
            the residual ``r = clamp(1 − Σ_K p, 0, 1)``; ``a = 1`` uses the stored values as is) or
            ``"none"`` (``p̂ = p^a``, not renormalised). With ``values="logits"`` only ``"renorm"``
            (``p̂ = softmax(a · logits_K)``).
        power: ``a = teacher_temperature / temperature``.

    Returns:
        ``(log_p̂ [..., k], log_r̂ [...])`` without gradient; ``log_r̂`` is −inf unless ``tail="bucket"``.
    """
    with torch.no_grad():
        lv = teacher_values.detach().to(accumulation_dtype(teacher_values.dtype))
        no_tail = torch.full(lv.shape[:-1], NEG_INF, dtype=lv.dtype, device=lv.device)
        if values == "logits" or tail == "renorm":
            return _powered_log_normalize(lv, power)[0], no_tail
        if tail == "none":  # p^a, unnormalised (log p ≤ 0, so no overflow for any a > 0)
            return (lv if power == 1.0 else torch.where(torch.isneginf(lv), lv, lv * power)), no_tail
        # tail == "bucket": residual r = clamp(1 − Σ_K p, 0, 1), computed as −expm1(log Σ_K p)
        kept_mass = torch.logsumexp(lv, dim=-1)
        residual = (-torch.expm1(kept_mass)).clamp(0.0, 1.0)
        log_r = torch.log(residual)
        if power == 1.0:
            return lv, log_r
        return _powered_log_normalize(lv, power, log_r)


def _shifted_log_softmax(z, mask, inv_temperature):
    """``log softmax(z/T)`` along dim 1 of ``z [N, n]`` over the entries where ``mask`` holds (all
    of them for ``mask=None``): ``(z − m)/T − log Σ exp((z − m)/T)`` with ``m`` the largest logit
    of the set (detached: a pure shift). Masked-out entries and empty sets give −inf / 0."""
    masked = z if mask is None else z.masked_fill(~mask, NEG_INF)
    top = masked.detach().amax(dim=1, keepdim=True)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    shifted = (masked - top) * inv_temperature
    lse = torch.logsumexp(shifted, dim=1, keepdim=True)
    return shifted - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def student_tail_log(log_q: torch.Tensor, ids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``log r_s`` with ``r_s = Σ_{j∉K} q_j`` the student's mass outside the kept ids, from the full
    ``log_q [N, V]``, clamped as DistillKit clamps ``Σ_K q`` to ``[1e-8, 1 − 1e-8]``: ``log r_s`` to
    ``[log 1e-8, log1p(−1e-8)]``. Summed over the tail itself, never as ``1 − Σ_K q`` (which keeps only
    ~eps/r_s of r_s's digits, and is 0 — DistillKit's log1p(−1) = −inf — once ``Σ_K q`` rounds to 1).
    Finite for every input; the gradient is zero where a clamp is active."""
    in_k = torch.zeros(log_q.shape, dtype=torch.int32, device=log_q.device).scatter_add_(1, ids, kept.int()) > 0
    outside = log_q.masked_fill(in_k, NEG_INF)
    empty = torch.isneginf(outside).all(dim=1, keepdim=True)  # k = V, or all the rest at −inf
    tail = torch.logsumexp(torch.where(empty, torch.zeros_like(outside), outside), dim=1)
    clamped = tail.clamp(math.log(TAIL_CLAMP), math.log1p(-TAIL_CLAMP))
    return torch.where(empty.squeeze(1), torch.full_like(tail, math.log(TAIL_CLAMP)), clamped)


def _row_kl(z, ids, log_p, log_r, *, student_support, inv_temperature):
    """Per-row KL of 2-D inputs in the accumulation dtype (z: ``[N, V]`` logits)."""
    kept = ~torch.isneginf(log_p)  # slots carrying teacher mass: the set K
    p = torch.exp(log_p)
    safe_log_p = torch.where(kept, log_p, torch.zeros_like(log_p))
    if student_support == "full":
        log_q = _shifted_log_softmax(z, None, inv_temperature)
        log_q_k = log_q.gather(1, ids)
    else:  # student renormalised over K (the "topk" alternative)
        log_q_k = _shifted_log_softmax(z.gather(1, ids), kept, inv_temperature)
    safe_log_q = torch.where(kept, log_q_k, torch.zeros_like(log_q_k))
    head = torch.where(kept, p * (safe_log_p - safe_log_q), torch.zeros_like(p)).sum(dim=1)
    if student_support != "full":
        return head
    has_tail = ~torch.isneginf(log_r)
    log_rs = student_tail_log(log_q, ids, kept)
    safe_log_r = torch.where(has_tail, log_r, torch.zeros_like(log_r))
    tail_term = torch.where(has_tail, torch.exp(safe_log_r) * (safe_log_r - log_rs), torch.zeros_like(log_r))
    return head + tail_term


def reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str, divisor) -> torch.Tensor:
    """Reduces masked per-row losses: ``"none"`` keeps them, ``"sum"`` adds them, ``"mean"``
    divides the sum by ``divisor`` (the counted rows, or ``num_items_in_batch``); a divisor ≤ 0
    gives 0, never NaN."""
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    divisor = torch.as_tensor(divisor, dtype=total.dtype, device=total.device)
    positive = divisor > 0
    safe = torch.where(positive, divisor, torch.ones_like(divisor))
    return torch.where(positive, total / safe, torch.zeros_like(total))


def topk_kl_reference(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    num_items_in_batch=None,
    options: TopKKLOptions | None = None,
    **option_kwargs,
) -> torch.Tensor:
    """Top-k sparse KL, computed directly (see the module docstring).

    Shapes: ``student_logits [..., V]``, ``teacher_ids [..., k]`` (int), ``teacher_values [..., k]``,
    ``labels [...]`` (int, aligned with the logits; ``ignore_index`` rows do not count). Options come as
    a :class:`~kdloss.topk_kl.TopKKLOptions` or as its keywords. Returns a scalar, or ``[...]`` for
    ``reduction="none"``, in the student's dtype (fp32 under autocast).
    """
    options = options or TopKKLOptions(**option_kwargs)
    values, tail, student_support = options.values, options.tail, options.student_support
    temperature, teacher_temperature = options.temperature, options.teacher_temperature
    ignore_index, reduction = options.ignore_index, options.reduction
    vocab = student_logits.shape[-1]
    k = teacher_ids.shape[-1]
    lead = student_logits.shape[:-1]
    acc = accumulation_dtype(student_logits.dtype)
    z = student_logits.reshape(-1, vocab).to(acc)
    ids = teacher_ids.reshape(-1, k).long()
    if labels is None:
        valid = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    else:
        valid = comparable(labels).reshape(-1) != ignore_index
    z = torch.where(valid[:, None], z, torch.zeros_like(z))  # ignored rows may hold anything
    log_p, log_r = teacher_log_targets(
        teacher_values.reshape(-1, k).to(acc), values=values, tail=tail,
        power=teacher_temperature / temperature,
    )
    rows = _row_kl(z, ids, log_p, log_r, student_support=student_support, inv_temperature=1.0 / temperature)
    if options.scale_by_t2:
        rows = rows * (temperature * temperature)
    divisor = valid.sum() if num_items_in_batch is None else num_items_in_batch
    out = reduce_rows(rows, valid, reduction, divisor)
    out = out.reshape(lead) if reduction == "none" else out
    return cast_loss(out, student_logits.dtype)
