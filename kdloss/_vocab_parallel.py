"""Vocabulary-parallel top-k KL and fused head: the output layer split over the ranks of a process group.

Each rank of ``group`` holds a contiguous shard ``[offset, offset + V_r)`` of the vocabulary: the
student logits ``[N, V_r]`` (or the head's rows ``weight [V_r, H]``) for the **same** N rows, with the
global teacher ids. Shard sizes may differ (an uneven last shard, or an empty one); the offsets come
from one all-gather of the sizes, in group-rank order.

Forward, per row, with ``t = 1/T``, ``p̂`` the teacher targets on the kept ids K, ``K_r = K ∩ shard r``:

* each rank computes its shard's log-sum-exp ``ℓ_r`` (the top-k kernel's forward streams the shard;
  over ``K_r`` for ``student_support="topk"``), the slot term ``h_r = Σ_{K_r} p̂ (log p̂ − (t·z_j − ℓ_r))``,
  the kept teacher mass ``P_r = Σ_{K_r} p̂`` and, for ``tail="bucket"``, ``κ_r = logsumexp_{K_r} t·z_j``;
* one all-gather of these 3 (4) numbers per row; every rank then combines them identically, in rank
  order: ``L = logsumexp_r ℓ_r`` (max-shifted, never overflows), ``KL = Σ_r h_r + P_r (L − ℓ_r)``,
  the student's kept mass ``c = exp(logsumexp_r κ_r − L)`` for the bucket term. So every rank holds
  the same (global) loss: no further all-reduce is needed.

Backward, local: ``∂loss/∂z_j = g·(α·q_j + β_j·[j∈K])`` with ``q_j = exp(t·z_j − L)`` and the global
per-row ``α`` and ``β`` saved by the forward, for the ``j`` of this shard only (derivation:
docs/topk_kl.md, Implementation). The dense part is written by the top-k kernel's backward, called
with one teacher slot of mass ``|α|`` at a position of the row that holds no kept slot (its value is
then ``g·|α|·q_j`` everywhere but that position); this module fixes up that position and the k kept
positions with one ``scatter_``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _ops
from ._autocast import cast_loss, no_autocast
from ._collectives import resolve_group
from ._dispatch import use_kernel
from ._topk import check_teacher, check_teacher_data, teacher_targets
from ._validation import (
    accumulation_dtype,
    check_bool,
    check_num_items,
    check_same_device,
    check_tensor,
    mean_divisor,
)

__all__ = ["fused_linear_topk_kl_vocab_parallel", "is_dtensor", "topk_kl_vocab_parallel"]

NEG_INF = float("-inf")
#: DistillKit's clamp of the student's kept mass in the tail-bucket term (as the kernels).
TAIL_CLAMP = 1e-8
_NONE, _MEAN, _SUM = 0, 1, 2
_REDUCTIONS = {"none": _NONE, "mean": _MEAN, "sum": _SUM}


# ----------------------------------------------------------------------------------------------
# Groups, DTensors and the shard layout


def is_dtensor(value) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``."""
    if not torch.distributed.is_available() or not isinstance(value, torch.Tensor):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _vocab_mesh_dim(value, vocab_dim: int, name: str, *, other_shards: bool) -> int:
    """The one mesh dimension over which the DTensor ``value`` shards ``vocab_dim``; other mesh
    dimensions must replicate (or, with ``other_shards``, shard another tensor dimension)."""
    from torch.distributed.tensor import Shard

    ndim = value.dim()
    vocab_dim %= ndim
    placements = tuple(value.placements)
    found = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim % ndim == vocab_dim]
    if len(found) != 1:
        raise ValueError(f"{name} is a DTensor: it must be sharded on its vocabulary dimension ({vocab_dim}) over "
                         f"exactly one mesh dimension, got placements {placements}")
    for i, p in enumerate(placements):
        if i == found[0] or p.is_replicate():
            continue
        if not (other_shards and isinstance(p, Shard) and p.dim % ndim != vocab_dim):
            raise ValueError(f"{name} is a DTensor whose other mesh dimensions must replicate it, "
                             f"got placements {placements}")
    return found[0]


def _same_group(a, b) -> bool:
    dist = torch.distributed
    return dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


def vocab_shard(value, group, vocab_dim: int, name: str, *, other_shards: bool = False):
    """``(local tensor, process group)``: a DTensor sharded on ``vocab_dim`` gives its local shard
    (``to_local``, differentiable) and its mesh dimension's group (which ``group``, if given, must
    equal); a plain tensor is this rank's shard of ``group``."""
    if is_dtensor(value):
        mesh_dim = _vocab_mesh_dim(value, vocab_dim, name, other_shards=other_shards)
        mesh_group = value.device_mesh.get_group(mesh_dim)
        if group is not None and not _same_group(resolve_group(group, "vocab_parallel_group"), mesh_group):
            raise ValueError(f"vocab_parallel_group must be the group of the mesh dimension that shards {name}'s "
                             "vocabulary (or None)")
        return value.to_local(), mesh_group
    return value, resolve_group(group, "vocab_parallel_group")


def shard_layout(vocab_local: int, group, device: torch.device) -> tuple[int, int]:
    """``(offset of this rank's shard, global vocabulary size)`` from one all-gather of the shard
    sizes (group-rank order)."""
    dist = torch.distributed
    world = dist.get_world_size(group)
    size = torch.tensor([vocab_local], dtype=torch.int64, device=device)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(sizes, size, group=group)
    sizes = sizes.tolist()
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


# ----------------------------------------------------------------------------------------------
# Per-row math


@dataclass(frozen=True)
class Config:
    """Everything but tensors: temperature, scale, variant, reduction code and the group."""

    inv_temperature: float
    scale: float
    full_support: bool
    bucket: bool
    reduction: int
    group: object

    @property
    def stats(self) -> int:
        """Per-row numbers each rank contributes: ℓ_r, h_r, P_r (and κ_r for the bucket tail)."""
        return 4 if self.bucket else 3


@dataclass(frozen=True)
class Slots:
    """The teacher side of a block of rows, as this shard sees it."""

    ids: torch.Tensor  # [N, k] int64 local ids; slots outside the shard (or without mass) point at 0
    mask: torch.Tensor  # [N, k] bool: the slot carries mass and lies in this shard
    free: torch.Tensor  # [N, 1] int64: a local position that no kept slot of the row uses (valid if V_r > k)
    log_p: torch.Tensor  # [N, k] teacher log-targets (global, replicated)
    log_r: torch.Tensor  # [N] tail log-target
    counted: torch.Tensor  # [N] bool

    def rows(self, s: slice) -> Slots:
        return Slots(self.ids[s], self.mask[s], self.free[s], self.log_p[s], self.log_r[s], self.counted[s])


def local_slots(ids, log_p, log_r, counted, offset: int, vocab_local: int) -> Slots:
    """The teacher slots of ``[offset, offset + vocab_local)`` in local ids, and a free position per row."""
    k = ids.shape[1]
    local = ids - offset
    mask = (local >= 0) & (local < vocab_local) & ~torch.isneginf(log_p)
    local_ids = torch.where(mask, local, torch.zeros_like(local))
    # kept local ids are unique: sorted, the first i with sorted[i] != i is free (≤ k)
    beyond = torch.where(mask, local, torch.full_like(local, vocab_local + k))
    ordered = beyond.sort(dim=1).values
    free = (ordered == torch.arange(k, device=ids.device)).sum(1, keepdim=True)
    return Slots(local_ids, mask, free, log_p, log_r, counted)


def _shard_logsumexp(logits, counted, inv_t: float, acc) -> torch.Tensor:
    """``log Σ_j exp(t·z_j)`` over the shard, by the top-k kernel's forward (one teacher slot without
    mass: only its log-sum-exp is used); 0 at rows that do not count, −inf for an empty shard."""
    rows, vocab_local = logits.shape
    if vocab_local == 0:
        return torch.full((rows,), NEG_INF, dtype=acc, device=logits.device)
    ids = torch.zeros(rows, 1, dtype=torch.int64, device=logits.device)
    no_mass = torch.full((rows, 1), NEG_INF, dtype=acc, device=logits.device)
    one = torch.ones((), dtype=acc, device=logits.device)
    _, stats = torch.ops.kdloss.topk_kl_fwd(logits, ids, no_mass, no_mass[:, 0], counted, one, _ops.float_arg(inv_t),
                                            _ops.float_arg(1.0), True, _NONE)
    # the kernel's per-row (m, l): max logit and log Σ exp((z − m)·t); the shard's lse of t·z is t·m + l
    return stats[:, 0] * inv_t + stats[:, 1]


def _kept_logits(logits, slots: Slots, inv_t: float, acc) -> torch.Tensor:
    """``t·z_j`` at the row's local slots ``[N, k]`` (−inf at slots outside K_r)."""
    if logits.shape[1] == 0:
        return torch.full(slots.ids.shape, NEG_INF, dtype=acc, device=logits.device)
    z = logits.gather(1, slots.ids).to(acc) * inv_t
    return torch.where(slots.mask, z, torch.full_like(z, NEG_INF))


def shard_stats(logits, slots: Slots, cfg: Config) -> torch.Tensor:
    """``[S, N]`` per-row numbers of this shard: ℓ_r, h_r, P_r (, κ_r); 0 at rows that do not count."""
    acc = slots.log_p.dtype
    tz = _kept_logits(logits, slots, cfg.inv_temperature, acc)
    kept_lse = torch.logsumexp(tz, dim=1)  # −inf when no kept slot lies in the shard
    lse = _shard_logsumexp(logits, slots.counted, cfg.inv_temperature, acc) if cfg.full_support else kept_lse
    log_q = torch.where(torch.isneginf(tz), tz, tz - lse[:, None])  # within the shard
    p = torch.exp(slots.log_p)
    zero = torch.zeros_like(p)
    head = torch.where(slots.mask, p * (slots.log_p - log_q), zero).sum(1)
    mass = torch.where(slots.mask, p, zero).sum(1)
    parts = [lse, head, mass] + ([kept_lse] if cfg.bucket else [])
    stats = torch.stack(parts)
    return torch.where(slots.counted, stats, torch.zeros_like(stats))


def gather_stats(stats: torch.Tensor, group) -> torch.Tensor:
    """``[W, S, N]``: every rank's ``[S, N]`` stats, in group-rank order (one all-gather)."""
    dist = torch.distributed
    world = dist.get_world_size(group)
    out = stats.new_empty((world * stats.shape[0], stats.shape[1]))
    dist.all_gather_into_tensor(out, stats.contiguous(), group=group)
    return out.view(world, *stats.shape)


@dataclass(frozen=True)
class Rows:
    """Per-row results of the combination, identical on every rank."""

    loss: torch.Tensor  # [N] scale·KL_row, 0 at rows that do not count
    lse: torch.Tensor  # [N] L: global log-sum-exp of t·z (over K for student_support="topk")
    alpha: torch.Tensor  # [N] coefficient of q_j in the gradient
    gamma: torch.Tensor  # [N] tail-bucket coefficient (β_j = γ·q_j − p̂_j)
    mass: torch.Tensor  # [N] Σ_K p̂


def combine(gathered: torch.Tensor, slots: Slots, cfg: Config) -> Rows:
    """Row loss and gradient coefficients from every shard's stats (the same result on every rank)."""
    shard_lse, head, mass = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    lse = torch.logsumexp(shard_lse, dim=0)
    if not cfg.full_support:  # no kept slot at all: the kernels' convention
        lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    # Σ_K p̂ (log p̂ − t·z_j + L) = Σ_r h_r + P_r (L − ℓ_r); shards without teacher mass add nothing
    shift = torch.where(mass > 0, mass * (lse - shard_lse), torch.zeros_like(mass))
    kl = (head + shift).sum(0)
    total_mass = mass.sum(0)
    gamma = torch.zeros_like(kl)
    alpha = total_mass if cfg.full_support else torch.zeros_like(kl)
    if cfg.bucket:
        kept_q = torch.exp(torch.logsumexp(gathered[:, 3], dim=0) - lse)
        has_tail = ~torch.isneginf(slots.log_r)
        r = torch.exp(slots.log_r)
        safe_log_r = torch.where(has_tail, slots.log_r, torch.zeros_like(r))
        # DistillKit's clamp of Σ_K q to [1e-8, 1 − 1e-8], the upper end applied as r_s = 1 − Σ_K q ≥ 1e-8
        # (1 − 1e-8 is 1 in fp32: log1p(−1) = −inf for a student confident on K), as the kernels do
        residual = 1.0 - kept_q
        high = ~(residual > TAIL_CLAMP)
        low = kept_q < TAIL_CLAMP
        inner = torch.log1p(-torch.where(high | low, torch.full_like(kept_q, TAIL_CLAMP), kept_q))
        log_rs = torch.where(high, torch.full_like(kept_q, math.log(TAIL_CLAMP)), inner)
        kl = kl + torch.where(has_tail, r * (safe_log_r - log_rs), torch.zeros_like(r))
        active = has_tail & ~high & ~low  # zero gradient where clamped
        gamma = torch.where(active, r / torch.where(active, residual, torch.ones_like(residual)), torch.zeros_like(r))
        alpha = total_mass - gamma * kept_q
    counted = slots.counted
    loss = torch.where(counted, cfg.scale * kl, torch.zeros_like(kl))
    return Rows(loss, torch.where(counted, lse, torch.zeros_like(lse)), alpha, gamma, total_mass)


def reduce_rows(loss_rows: torch.Tensor, divisor: torch.Tensor, reduction: int) -> torch.Tensor:
    """The rows (none), their sum, or their sum ÷ ``divisor`` (mean; a divisor ≤ 0 gives 0)."""
    if reduction == _NONE:
        return loss_rows
    total = loss_rows.sum()
    if reduction == _SUM:
        return total
    positive = divisor > 0
    return torch.where(positive, total / torch.where(positive, divisor, torch.ones_like(divisor)),
                       torch.zeros_like(total))


def row_grads(grad: torch.Tensor, rows: int, divisor: torch.Tensor, counted: torch.Tensor, reduction: int, acc):
    """``∂loss/∂(scale·KL_row)`` per row ``[N]`` in ``acc`` (0 at rows that do not count)."""
    g = grad.to(acc).reshape(-1) if reduction == _NONE else grad.to(acc).reshape(()).expand(rows)
    if reduction == _MEAN:
        positive = divisor > 0
        g = torch.where(positive, g / torch.where(positive, divisor, torch.ones_like(divisor)), torch.zeros_like(g))
    return torch.where(counted, g, torch.zeros_like(g))


def shard_grad(logits, slots: Slots, rows: Rows, g: torch.Tensor, cfg: Config) -> torch.Tensor:
    """``[N, V_r]`` gradient of the loss w.r.t. this shard's logits, for row gradients ``g [N]``."""
    acc = slots.log_p.dtype
    vocab_local, k = logits.shape[1], slots.ids.shape[1]
    if vocab_local == 0:
        return torch.zeros_like(logits)
    inv_t = cfg.inv_temperature
    live = (g != 0)[:, None]
    coeff = g * (cfg.scale * inv_t)  # ∂loss/∂z_j = coeff·(α·q_j + β_j·[j∈K])
    q = torch.exp(_kept_logits(logits, slots, inv_t, acc) - rows.lse[:, None])  # 0 outside K_r
    p = torch.exp(slots.log_p)
    if cfg.full_support:
        slot_coeff = (rows.alpha + rows.gamma)[:, None] * q - p
    else:
        slot_coeff = rows.mass[:, None] * q - p
    slot_grad = torch.where(live & slots.mask, coeff[:, None] * slot_coeff, torch.zeros_like(q))
    if vocab_local <= k:  # a shard this small may have no free position: dense, in PyTorch
        return _small_shard_grad(logits, slots, rows, coeff, live, slot_grad, q, cfg)
    if cfg.full_support:
        out = _dense_part(logits, slots.free, rows, g, slots.counted, cfg)
        z_free = logits.gather(1, slots.free).to(acc) * inv_t
        free_grad = coeff[:, None] * rows.alpha[:, None] * torch.exp(z_free - rows.lse[:, None])
        free_grad = torch.where(live, free_grad, torch.zeros_like(free_grad))
    else:
        out = torch.zeros_like(logits)
        free_grad = torch.zeros_like(slots.free, dtype=acc)
    # one scatter: kept slots get their value; all other slots and the free position get the (same)
    # value of the free position, so duplicate indices always carry identical values
    index = torch.cat([torch.where(slots.mask, slots.ids, slots.free), slots.free], dim=1)
    values = torch.cat([torch.where(slots.mask, slot_grad, free_grad.expand(-1, k)), free_grad], dim=1)
    return out.scatter_(1, index, values.to(out.dtype))


def _dense_part(logits, free, rows: Rows, g, counted, cfg: Config) -> torch.Tensor:
    """``g·scale·t·α·q_j`` over the shard, by the top-k kernel's backward with one teacher slot of mass
    ``|α|`` at ``free`` and the sign of α in the row gradient (the value at ``free`` is wrong: fixed later)."""
    alpha = rows.alpha
    log_abs_alpha = torch.log(alpha.abs())[:, None].contiguous()
    no_tail = torch.full_like(alpha, NEG_INF)
    one = torch.ones((), dtype=alpha.dtype, device=alpha.device)
    # per-row stats (m, l) = (0, L): the kernel's q_j = exp((z_j − m)·t − l) is then exp(t·z_j − L)
    stats = torch.stack([torch.zeros_like(rows.lse), rows.lse], dim=1).contiguous()
    return torch.ops.kdloss.topk_kl_bwd((g * torch.sign(alpha)).contiguous(), stats, logits, free.contiguous(),
                                        log_abs_alpha, no_tail, counted, one, _ops.float_arg(cfg.inv_temperature),
                                        _ops.float_arg(cfg.scale), True, _NONE)


def _small_shard_grad(logits, slots: Slots, rows: Rows, coeff, live, slot_grad, q, cfg: Config) -> torch.Tensor:
    """The gradient of a shard with ``V_r ≤ k`` densely in the accumulation dtype (one rounding)."""
    acc = slots.log_p.dtype
    if cfg.full_support:
        dense = torch.exp(logits.to(acc) * cfg.inv_temperature - rows.lse[:, None])
        dense = torch.where(live, (coeff * rows.alpha)[:, None] * dense, torch.zeros_like(dense))
        # the kept slots' value minus the dense part already there
        slot_grad = slot_grad - torch.where(live & slots.mask, (coeff * rows.alpha)[:, None] * q,
                                            torch.zeros_like(q))
    else:
        dense = torch.zeros(logits.shape, dtype=acc, device=logits.device)
    return dense.scatter_add_(1, slots.ids, slot_grad).to(logits.dtype)  # masked slots add exact zeros


# ----------------------------------------------------------------------------------------------
# Autograd


class _TopKKLVocabParallel(torch.autograd.Function):
    """Loss over a vocabulary shard of ``logits [N, V_r]``; backward is local (no communication)."""

    @staticmethod
    def forward(ctx, logits, slots: Slots, divisor, cfg: Config):
        stats = shard_stats(logits, slots, cfg)
        rows = combine(gather_stats(stats, cfg.group), slots, cfg)
        ctx.save_for_backward(logits)
        ctx.slots, ctx.rows, ctx.divisor, ctx.cfg = slots, rows, divisor, cfg
        return reduce_rows(rows.loss, divisor, cfg.reduction)  # accumulation dtype: cast_loss decides

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        slots, cfg = ctx.slots, ctx.cfg
        g = row_grads(grad, logits.shape[0], ctx.divisor, slots.counted, cfg.reduction, slots.log_p.dtype)
        return shard_grad(logits, slots, ctx.rows, g, cfg), None, None, None


class _GatherVocab(torch.autograd.Function):
    """``[N, V]`` from every rank's ``[N, V_r]`` (group-rank order); backward: this rank's columns."""

    @staticmethod
    def forward(ctx, local, group, offset: int):
        dist = torch.distributed
        world = dist.get_world_size(group)
        widths = torch.empty(world, dtype=torch.int64, device=local.device)
        dist.all_gather_into_tensor(widths, torch.tensor([local.shape[1]], device=local.device), group=group)
        widths = widths.tolist()
        wire = local.detach().to(accumulation_dtype(local.dtype))  # gloo lacks bf16/fp16 on some builds
        padded = wire.new_zeros((local.shape[0], max(widths)))
        padded[:, : local.shape[1]] = wire
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.columns = (offset, local.shape[1])
        return torch.cat([part[:, :w] for part, w in zip(parts, widths, strict=True)], dim=1).to(local.dtype)

    @staticmethod
    def backward(ctx, grad):
        offset, width = ctx.columns
        return grad[:, offset: offset + width], None, None


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over ``group`` — what a
    column-parallel layer's replicated input needs."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


# ----------------------------------------------------------------------------------------------
# topk_kl_loss(..., vocab_parallel_group=...)


def _check_local_logits(logits) -> int:
    check_tensor(logits, "student_logits")
    if logits.dim() < 1:
        raise ValueError(f"student_logits must be [..., V_r] (this rank's vocabulary shard), got shape "
                         f"{tuple(logits.shape)}")
    return logits.shape[-1]


def _reference_loss(full_logits, teacher_ids, teacher_values, labels, options, num_items):
    from .reference.topk_kl import topk_kl_reference

    return topk_kl_reference(full_logits, teacher_ids, teacher_values, labels, options=options,
                             num_items_in_batch=num_items)


def topk_kl_vocab_parallel(student_logits, teacher_ids, teacher_values, labels, *, options, num_items_in_batch,
                           backend: str, group, validate: bool = True) -> torch.Tensor:
    """:func:`kdloss.topk_kl_loss` with ``student_logits`` this rank's vocabulary shard (see the module
    docstring); every rank of the group must call it with the same rows and teacher."""
    local, pg = vocab_shard(student_logits, group, -1, "student_logits", other_shards=True)
    vocab_local = _check_local_logits(local)
    lead = tuple(local.shape[:-1])
    check_teacher(teacher_ids, teacher_values, labels, lead, "student_logits [..., V_r]")
    tensors = {"student_logits": local, "teacher_ids": teacher_ids, "teacher_values": teacher_values}
    if labels is not None:
        tensors["labels"] = labels
    device = check_same_device(**tensors)
    num_items = check_num_items(num_items_in_batch, options.reduction, device)
    offset, vocab = shard_layout(vocab_local, pg, device)
    if validate:
        check_teacher_data(teacher_ids, teacher_values, labels, vocab, options.ignore_index)
    if not use_kernel("topk_kl", device, backend):
        full = _GatherVocab.apply(local, pg, offset)
        return _reference_loss(full, teacher_ids, teacher_values, labels, options, num_items)
    acc = accumulation_dtype(local.dtype)
    logits = local.reshape(math.prod(lead), vocab_local)  # (-1, 0) would be ambiguous for an empty shard
    if vocab_local > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    ids, log_p, log_r, counted = teacher_targets(teacher_ids, teacher_values, labels, logits.shape[0], options, acc)
    slots = local_slots(ids, log_p, log_r, counted, offset, vocab_local)
    cfg = Config(1.0 / options.temperature, options.scale, options.student_support == "full",
                 options.tail == "bucket" and options.student_support == "full", _REDUCTIONS[options.reduction], pg)
    loss = _TopKKLVocabParallel.apply(logits, slots, mean_divisor(counted, num_items, acc), cfg)
    return cast_loss(loss.reshape(lead) if options.reduction == "none" else loss, student_logits.dtype)


# ----------------------------------------------------------------------------------------------
# fused_linear_topk_kl_loss(..., vocab_parallel_group=...)


@dataclass(frozen=True)
class HeadConfig:
    softcap: float
    chunk_size: int
    all_reduce_hidden_grad: bool
    compute_grad: bool  # gradients in the forward (scalar reductions that need them)


class _FusedVocabParallel(torch.autograd.Function):
    """Fused head over this rank's rows of the output layer, chunk by chunk (one all-gather per chunk)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, slots: Slots, divisor, cfg: Config, head: HeadConfig):
        with no_autocast(hidden.device.type):  # the chunk GEMMs pick their own dtypes
            return _FusedVocabParallel._forward(ctx, hidden, weight, bias, slots, divisor, cfg, head)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, slots: Slots, divisor, cfg: Config, head: HeadConfig):
        from .fused_linear_topk_kl import _accumulate_chunk_grads, _chunk_rows, _chunks, _grad_buffers, chunk_logits

        rows_n = hidden.shape[0]
        acc = slots.log_p.dtype
        per_row = {name: torch.empty(rows_n, dtype=acc, device=hidden.device)
                   for name in ("loss", "lse", "alpha", "gamma", "mass")}
        compute_grad = head.compute_grad
        grads = _grad_buffers(hidden, weight, bias) if compute_grad else None
        unit = None
        if compute_grad:  # row gradients for an upstream gradient of 1: scaled in the backward
            unit = row_grads(torch.ones((), dtype=acc, device=hidden.device), rows_n, divisor, slots.counted,
                             cfg.reduction, acc)
        for s in _chunks(rows_n, head.chunk_size):
            chunk = slots.rows(s)
            hidden_c = _chunk_rows(hidden, s, weight)
            capped = chunk_logits(hidden_c, weight, bias, head.softcap)
            rows = combine(gather_stats(shard_stats(capped, chunk, cfg), cfg.group), chunk, cfg)
            for name in per_row:
                per_row[name][s] = getattr(rows, name)
            if compute_grad:
                grad_logits = shard_grad(capped, chunk, rows, unit[s], cfg)
                grad_hidden, grad_weight, grad_bias = grads
                _accumulate_chunk_grads(grad_logits, capped, hidden_c, weight, head.softcap, grad_hidden[s],
                                        grad_weight, grad_bias)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.slots, ctx.divisor, ctx.cfg, ctx.head = slots, divisor, cfg, head
        ctx.rows = Rows(**per_row)
        ctx.grads = grads
        return reduce_rows(per_row["loss"], divisor, cfg.reduction)  # accumulation dtype: cast_loss decides

    @staticmethod
    def backward(ctx, grad):
        with no_autocast(grad.device.type):
            return _FusedVocabParallel._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        from .fused_linear_topk_kl import _accumulate_chunk_grads, _chunk_rows, _chunks, _grad_buffers, chunk_logits

        hidden, weight, bias = ctx.saved_tensors
        slots, cfg, head = ctx.slots, ctx.cfg, ctx.head
        acc = slots.log_p.dtype
        if ctx.grads is not None:  # computed in the forward for an upstream gradient of 1
            scale = grad.to(acc)
            grad_hidden, grad_weight, grad_bias = (None if t is None else (t * scale).to(t.dtype) for t in ctx.grads)
        else:
            grad_hidden, grad_weight, grad_bias = _grad_buffers(hidden, weight, bias)
            g = row_grads(grad, hidden.shape[0], ctx.divisor, slots.counted, cfg.reduction, acc)
            for s in _chunks(hidden.shape[0], head.chunk_size):
                chunk = slots.rows(s)
                rows = Rows(*(getattr(ctx.rows, name)[s] for name in ("loss", "lse", "alpha", "gamma", "mass")))
                hidden_c = _chunk_rows(hidden, s, weight)
                capped = chunk_logits(hidden_c, weight, bias, head.softcap)
                grad_logits = shard_grad(capped, chunk, rows, g[s], cfg)
                _accumulate_chunk_grads(grad_logits, capped, hidden_c, weight, head.softcap, grad_hidden[s],
                                        grad_weight, grad_bias)
        if head.all_reduce_hidden_grad and ctx.needs_input_grad[0]:
            torch.distributed.all_reduce(grad_hidden, group=cfg.group)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        needs = ctx.needs_input_grad
        return (grad_hidden if needs[0] else None, grad_weight if needs[1] else None,
                grad_bias if needs[2] else None, None, None, None, None)


def _check_head_shard(hidden, weight, bias) -> int:
    """As the single-device head's checks, but the shard may be empty (``V_r = 0``)."""
    check_tensor(hidden, "hidden")
    check_tensor(weight, "weight", ndim=2)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must be [N, H] (or [..., H]) with H >= 1, got shape {tuple(hidden.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V_r, H] (this rank's rows of the head) with H = {hidden.shape[-1]} "
                         f"(from hidden), got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V_r] with V_r = {weight.shape[0]} (from weight), "
                             f"got shape {tuple(bias.shape)}")
    from .fused_linear_topk_kl import check_head_dtypes

    check_head_dtypes(hidden, weight, bias)
    return weight.shape[0]


def _head_shards(hidden, weight, bias, group):
    """Local tensors and the group, from plain tensors + ``group`` or from DTensors sharding the vocabulary."""
    if not is_dtensor(weight):
        for name, t in (("hidden", hidden), ("bias", bias)):
            if is_dtensor(t):
                raise TypeError(f"{name} is a DTensor but weight is not: pass the head as DTensors (weight "
                                "Shard(0)) or all as local tensors with vocab_parallel_group")
        return hidden, weight, bias, resolve_group(group, "vocab_parallel_group")
    local_weight, pg = vocab_shard(weight, group, 0, "weight")
    if bias is not None:
        if not is_dtensor(bias):
            raise TypeError("bias must be a DTensor sharded like weight (Shard(0) on the same mesh dimension)")
        local_bias, bias_pg = vocab_shard(bias, None, 0, "bias")
        if not _same_group(bias_pg, pg):
            raise ValueError("bias must be sharded over the same mesh dimension as weight")
        bias = local_bias
    if is_dtensor(hidden):
        from torch.distributed.tensor import Replicate

        mesh_dim = _vocab_mesh_dim(weight, 0, "weight", other_shards=False)
        if hidden.placements[mesh_dim] != Replicate():
            raise ValueError("hidden must be replicated over the mesh dimension that shards weight's vocabulary, "
                             f"got placements {tuple(hidden.placements)}")
        hidden = hidden.to_local()
    elif group is None:
        raise ValueError(
            "weight is a DTensor sharded on the vocabulary but hidden is a plain tensor: pass "
            "vocab_parallel_group=<its group or mesh> to confirm that hidden is the same on every rank of it "
            "(tensor parallelism). A weight sharded by FSDP is not vocabulary-parallel: call the loss where "
            "FSDP has gathered it (see docs/fused_linear_topk_kl.md)"
        )
    return hidden, local_weight, bias, pg


def fused_linear_topk_kl_vocab_parallel(hidden, weight, teacher_ids, teacher_values, labels, *, bias, options,
                                        num_items_in_batch, backend: str, group,
                                        all_reduce_hidden_grad: bool, validate: bool = True) -> torch.Tensor:
    """:func:`kdloss.fused_linear_topk_kl_loss` with ``weight`` (and ``bias``) this rank's rows of the
    output layer; ``hidden`` the same on every rank of the group."""
    check_bool(all_reduce_hidden_grad, "all_reduce_hidden_grad")
    hidden, weight, bias, pg = _head_shards(hidden, weight, bias, group)
    vocab_local = _check_head_shard(hidden, weight, bias)
    lead = tuple(hidden.shape[:-1])
    check_teacher(teacher_ids, teacher_values, labels, lead, "hidden [..., H]")
    tensors = {"hidden": hidden, "weight": weight, "teacher_ids": teacher_ids, "teacher_values": teacher_values}
    tensors.update({name: t for name, t in (("bias", bias), ("labels", labels)) if t is not None})
    device = check_same_device(**tensors)
    num_items = check_num_items(num_items_in_batch, options.reduction, device)
    offset, vocab = shard_layout(vocab_local, pg, device)
    if validate:
        check_teacher_data(teacher_ids, teacher_values, labels, vocab, options.ignore_index)
    softcap = 0.0 if options.softcap is None else float(options.softcap)
    if not use_kernel("fused_linear_topk_kl", device, backend):
        from .fused_linear_topk_kl import chunk_logits

        source = _CopyToGroup.apply(hidden, pg) if all_reduce_hidden_grad else hidden
        with no_autocast(device.type):  # logits in the weight's dtype (a bf16/fp16 hidden is upcast)
            local_logits = chunk_logits(source.to(weight.dtype), weight, bias, softcap)
        full = _GatherVocab.apply(local_logits.reshape(math.prod(lead), vocab_local), pg, offset)
        full = full.reshape(*lead, vocab)
        return _reference_loss(full, teacher_ids, teacher_values, labels, options, num_items)
    acc = accumulation_dtype(hidden.dtype)
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids, log_p, log_r, counted = teacher_targets(teacher_ids, teacher_values, labels, flat.shape[0], options, acc)
    slots = local_slots(ids, log_p, log_r, counted, offset, vocab_local)
    cfg = Config(1.0 / options.temperature, options.scale, options.student_support == "full",
                 options.tail == "bucket" and options.student_support == "full", _REDUCTIONS[options.reduction], pg)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    chunk_size = options.rows_per_chunk(max(vocab_local, 1), weight.dtype, device)
    head = HeadConfig(softcap, chunk_size, all_reduce_hidden_grad, needs_grad and options.reduction != "none")
    loss = _FusedVocabParallel.apply(flat, weight, bias, slots, mean_divisor(counted, num_items, acc), cfg, head)
    logits_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return cast_loss(loss.reshape(lead) if options.reduction == "none" else loss, logits_dtype)
