"""What the top-k losses share (``topk_kl`` and ``fused_linear_topk_kl`` both run the top-k kernels):
their options, the checks of the sparse teacher, and the teacher's log-targets in the form the ops take.

Teacher targets. Per position the teacher gives values on its kept ids ``K``; ``-inf`` means
probability 0 and such a slot is not part of ``K``. With ``a = teacher_temperature / temperature``:

* ``values="logits"`` (needs ``tail="renorm"``): ``p̂ = softmax(a · v)`` over ``K``;
* ``tail="renorm"``: ``p̂ ∝ p^a`` renormalised over ``K`` (DistillKit's "zero");
* ``tail="none"``: ``p̂ = p^a`` as is (unnormalised: biased top-k KD, and the form of RS-KD sampled targets);
* ``tail="bucket"``: the residual ``r = clamp(1 − Σ_K p, 0, 1)`` is one more outcome; with ``a ≠ 1`` the
  ``k + 1`` outcomes are power-transformed and renormalised together (DistillKit's "symmetric_uniform").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import (
    REDUCTIONS,
    check_bool,
    check_index_tensor,
    check_int,
    check_label_values,
    check_labels,
    check_option,
    check_scale,
    check_tensor,
    comparable,
    has_data,
)

__all__ = [
    "SUPPORTS", "TAILS", "VALUES", "TopKKLOptions", "check_teacher", "check_teacher_data", "teacher_targets",
    "temperature_args",
]

VALUES = ("logprobs", "logits")
TAILS = ("renorm", "bucket", "none")
SUPPORTS = ("full", "topk")
NEG_INF = float("-inf")


@dataclass(frozen=True)
class TopKKLOptions:
    """Options of :func:`kdloss.topk_kl_loss` (and of the fused head), validated on construction.

    Args:
        values: ``"logprobs"`` (default) or ``"logits"``: what ``teacher_values`` holds.
        tail: ``"renorm"`` (default), ``"bucket"`` or ``"none"`` (see the module docstring).
        student_support: ``"full"`` (default; student log-softmax over the vocabulary) or ``"topk"``
            (student renormalised over the teacher's ids).
        temperature: distillation temperature T > 0 (default 1.0).
        teacher_temperature: temperature T_g > 0 at which the stored values were generated (default 1.0).
        scale_by_t2: multiply the loss by T² (default True).
        ignore_index: label value of positions that do not count (default -100).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
    """

    values: str = "logprobs"
    tail: str = "renorm"
    student_support: str = "full"
    temperature: float = 1.0
    teacher_temperature: float = 1.0
    scale_by_t2: bool = True
    ignore_index: int = -100
    reduction: str = "mean"

    def __post_init__(self) -> None:
        check_option(self.values, "values", VALUES)
        check_option(self.tail, "tail", TAILS)
        check_option(self.student_support, "student_support", SUPPORTS)
        check_scale(self.temperature, "temperature")
        check_scale(self.teacher_temperature, "teacher_temperature")
        check_bool(self.scale_by_t2, "scale_by_t2")
        check_int(self.ignore_index, "ignore_index")
        check_option(self.reduction, "reduction", REDUCTIONS)
        if self.values == "logits" and self.tail != "renorm":
            raise ValueError(
                f"tail must be 'renorm' when values='logits' (a softmax over the kept logits has no residual "
                f"mass), got {self.tail!r}"
            )
        if self.student_support == "topk" and self.tail == "bucket":
            raise ValueError("tail must not be 'bucket' with student_support='topk' (the student has no tail there)")

    @property
    def power(self) -> float:
        """``a = teacher_temperature / temperature``: the teacher's re-tempering exponent."""
        return self.teacher_temperature / self.temperature

    @property
    def scale(self) -> float:
        """``T²`` with ``scale_by_t2``, else 1."""
        return self.temperature * self.temperature if self.scale_by_t2 else 1.0


def check_teacher(teacher_ids, teacher_values, labels, lead: tuple, owner: str) -> None:
    """Types and shapes of the sparse teacher and the labels against the student's leading dims ``lead``."""
    check_index_tensor(teacher_ids, "teacher_ids")
    check_tensor(teacher_values, "teacher_values")
    if teacher_ids.dim() != len(lead) + 1 or tuple(teacher_ids.shape[:-1]) != lead:
        raise ValueError(
            f"teacher_ids must be [..., k] with the leading dims {lead} of {owner}, "
            f"got shape {tuple(teacher_ids.shape)}"
        )
    if teacher_ids.shape[-1] == 0:
        raise ValueError("teacher_ids must hold at least one id per position, got k = 0")
    if teacher_values.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher_values must have the shape of teacher_ids {tuple(teacher_ids.shape)}, "
            f"got {tuple(teacher_values.shape)}"
        )
    check_labels(labels, lead, owner)


def check_teacher_data(teacher_ids, teacher_values, labels, vocab: int, ignore_index: int) -> None:
    """Data-dependent checks (one host sync; skipped while ``torch.compile`` traces): ids in ``[0, V)``,
    no id repeated with non-zero teacher mass within a position, labels in ``[0, V)`` or ``ignore_index``."""
    if not has_data(teacher_ids) or teacher_ids.numel() == 0:
        return
    k = teacher_ids.shape[-1]
    ids = comparable(teacher_ids).reshape(-1, k).long()
    bad_range = ((ids < 0) | (ids >= vocab)).any()
    has_mass = teacher_values.reshape(-1, k) != NEG_INF
    # massless slots get distinct negative keys so that only ids carrying mass can collide
    keys = torch.where(has_mass, ids, -1 - torch.arange(k, device=ids.device))
    sorted_keys = keys.sort(dim=-1).values
    duplicate = (sorted_keys[:, 1:] == sorted_keys[:, :-1]).any()
    flags = torch.stack([bad_range, duplicate]).tolist()
    if flags[0]:
        raise ValueError(f"teacher_ids must lie in [0, V) with V = {vocab}, got min {ids.min().item()}, "
                         f"max {ids.max().item()}")
    if flags[1]:
        raise ValueError(
            "teacher_ids must be unique within each position among slots with non-zero teacher mass "
            "(a repeated id double-counts; pad with any id and a -inf value instead)"
        )
    check_label_values(labels, vocab, ignore_index)


def _powered(log_w: torch.Tensor, power: float) -> torch.Tensor:
    return log_w if power == 1.0 else torch.where(torch.isneginf(log_w), log_w, log_w * power)


def _powered_log_normalize(log_w: torch.Tensor, power: float) -> torch.Tensor:
    """``a·log_w − logsumexp(a·log_w)`` along the last dim, −inf slots kept; an all −inf row stays −inf.

    The values are shifted by the row maximum before the multiplication by ``a``: with a huge power
    (a tiny distillation temperature) ``a·log_w`` would be −inf for every slot below 0, and the
    normalisation −inf − (−inf); shifted first, the result is the one-hot limit. Two fresh ``[N, k]``
    buffers (the shifted values, the result): on CPU the targets are float64, and each fresh buffer
    costs page faults."""
    massless = torch.isneginf(log_w)
    top = log_w.amax(dim=-1, keepdim=True)
    shifted = log_w - top.masked_fill_(torch.isinf(top), 0.0)  # −inf slots stay −inf
    if power != 1.0:
        shifted.mul_(power)
    return torch.log_softmax(shifted, dim=-1).masked_fill_(massless, NEG_INF)  # all −inf rows: NaN → −inf


def log_targets(values: torch.Tensor, options: TopKKLOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p̂ [N, k], log r̂ [N])`` from the stored values ``[N, k]`` (already in the accumulation
    dtype); ``log r̂`` is −inf except with ``tail="bucket"``."""
    power = options.power
    no_tail = values.new_full(values.shape[:-1], NEG_INF)
    if options.values == "logits" or options.tail == "renorm":
        return _powered_log_normalize(values, power), no_tail
    if options.tail == "none":
        return _powered(values, power), no_tail
    # residual r = 1 − Σ_K p as −expm1(log Σ_K p): exact where the kept mass is close to 1
    log_r = torch.log((-torch.expm1(torch.logsumexp(values, dim=-1))).clamp(0.0, 1.0))
    if power == 1.0:
        return values, log_r
    joint = _powered_log_normalize(torch.cat([values, log_r.unsqueeze(-1)], dim=-1), power)
    return joint[..., :-1], joint[..., -1]


def target_dtype(device: torch.device, acc: torch.dtype) -> torch.dtype:
    """The dtype of the teacher log-targets handed to the top-k kernels: float64 on CPU, where the
    kernels do the kept slots' O(k) arithmetic in double (an fp32 ``log p̂`` alone puts a relative
    ``|log p̂|·2⁻²⁴`` on ``p̂``, which ``T·scale`` turns into most of a kept gradient's error at a large
    temperature); the accumulation dtype on CUDA."""
    return torch.float64 if device.type == "cpu" else acc


def teacher_targets(teacher_ids, teacher_values, labels, rows: int, options: TopKKLOptions, acc: torch.dtype):
    """The op-level teacher side: ids ``[N, k]`` int64, ``log p̂ [N, k]`` and ``log r̂ [N]`` in ``acc``
    (contiguous, no gradient), and the ``counted [N]`` bool row mask."""
    k = teacher_ids.shape[-1]
    ids = teacher_ids.reshape(rows, k).to(torch.int64).contiguous()
    with torch.no_grad():
        log_p, log_r = log_targets(teacher_values.detach().reshape(rows, k).to(acc), options)
    if labels is None:
        counted = torch.ones(rows, dtype=torch.bool, device=teacher_ids.device)
    else:
        counted = (comparable(labels).reshape(rows) != options.ignore_index).contiguous()
    return ids, log_p.contiguous(), log_r.contiguous(), counted


def temperature_args(options: TopKKLOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The ops' ``inv_temperature`` (1/T) and ``scale`` (T² or 1) as 0-d float64 CPU tensors
    (:func:`kdloss._ops.float_arg`: traced by ``torch.compile``, never baked into a cached graph)."""
    from . import _ops

    return _ops.float_arg(1.0 / options.temperature), _ops.float_arg(options.scale)
