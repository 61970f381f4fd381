"""Top-k sparse KL over a large vocabulary: readable pure-PyTorch reference.

Per row (position) with student logits ``z ∈ R^V``, kept teacher ids ``K`` and teacher values on
``K``:

* teacher target ``p̂`` on ``K`` (+ an optional tail bucket ``r̂``) from :func:`teacher_log_targets`
  (power transform ``p^a``, ``a = teacher_temperature / temperature``);
* student ``log q = log_softmax(z / T)`` over the full vocabulary (or over ``K`` only with
  ``student_support="topk"``);
* ``KL_row = Σ_K p̂ (log p̂ − log q) [+ r̂ (log r̂ − log r_s)]`` with xlogy semantics (slots of zero
  teacher mass contribute nothing, and are not part of ``K``), ``r_s = 1 − Σ_K q`` clamped as
  DistillKit does;
* ``loss = T² · Σ_{counted rows} KL_row / num_items`` (``T²`` only with ``scale_by_t2``).

Everything here materialises ``[N, V]`` fp32/fp64 tensors: it is the ground truth of the kernel
tests and the fallback, not the fast path.
"""

from __future__ import annotations

import torch

from .._autocast import cast_loss
from .._topk import TopKKLOptions
from .._validation import accumulation_dtype, comparable

__all__ = ["TAIL_CLAMP", "reduce_rows", "teacher_log_targets", "topk_kl_reference"]

NEG_INF = float("-inf")
#: DistillKit's clamp of the student's kept mass in the tail-bucket term.
TAIL_CLAMP = 1e-8


def _masked_log_normalize(log_w: torch.Tensor, extra: torch.Tensor | None = None):
    """``log_w − logsumexp(log_w [, extra])`` along the last dim (``extra [...]`` is one more
    outcome), keeping −inf slots at −inf; a row with no mass at all stays −inf, never NaN."""
    parts = log_w if extra is None else torch.cat([log_w, extra.unsqueeze(-1)], dim=-1)
    log_z = torch.logsumexp(parts, dim=-1)
    log_z = torch.where(torch.isneginf(log_z), torch.zeros_like(log_z), log_z)
    head = torch.where(torch.isneginf(log_w), log_w, log_w - log_z.unsqueeze(-1))
    if extra is None:
        return head, None
    return head, torch.where(torch.isneginf(extra), extra, extra - log_z)


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
        scaled = lv if power == 1.0 else torch.where(torch.isneginf(lv), lv, lv * power)
        no_tail = torch.full(lv.shape[:-1], NEG_INF, dtype=lv.dtype, device=lv.device)
        if values == "logits" or tail == "renorm":
            return _masked_log_normalize(scaled)[0], no_tail
        if tail == "none":
            return scaled, no_tail
        # tail == "bucket": residual r = clamp(1 − Σ_K p, 0, 1), computed as −expm1(log Σ_K p)
        kept_mass = torch.logsumexp(lv, dim=-1)
        residual = (-torch.expm1(kept_mass)).clamp(0.0, 1.0)
        log_r = torch.log(residual)
        if power == 1.0:
            return lv, log_r
        log_r_a = torch.where(torch.isneginf(log_r), log_r, log_r * power)
        return _masked_log_normalize(scaled, log_r_a)


def _row_kl(z, ids, log_p, log_r, *, student_support, inv_temperature):
    """Per-row KL of 2-D inputs in the accumulation dtype (z: ``[N, V]`` logits)."""
    kept = ~torch.isneginf(log_p)  # slots carrying teacher mass: the set K
    p = torch.exp(log_p)
    safe_log_p = torch.where(kept, log_p, torch.zeros_like(log_p))
    zt = z * inv_temperature
    zt_k = zt.gather(1, ids)
    if student_support == "full":
        log_q_k = zt_k - torch.logsumexp(zt, dim=1, keepdim=True)
    else:  # student renormalised over K (the "topk" alternative)
        lse_k = torch.logsumexp(zt_k.masked_fill(~kept, NEG_INF), dim=1, keepdim=True)
        lse_k = torch.where(torch.isneginf(lse_k), torch.zeros_like(lse_k), lse_k)
        log_q_k = zt_k - lse_k
    head = torch.where(kept, p * (safe_log_p - log_q_k), torch.zeros_like(p)).sum(dim=1)
    if student_support != "full":
        return head
    has_tail = ~torch.isneginf(log_r)
    kept_q = torch.where(kept, torch.exp(log_q_k), torch.zeros_like(p)).sum(dim=1)
    log_rs = torch.log1p(-kept_q.clamp(TAIL_CLAMP, 1.0 - TAIL_CLAMP))
    safe_log_r = torch.where(has_tail, log_r, torch.zeros_like(log_r))
    tail_term = torch.where(has_tail, torch.exp(log_r) * (safe_log_r - log_rs), torch.zeros_like(log_r))
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
