"""Top-k sparse KL over a large vocabulary (spec §3, decision 3): ``topk_kl_loss`` and ``TopKKLLoss``.

The teacher comes as its top-k per position (ids plus log-probs or logits, as DistillKit stores
them, or sampled RS-KD targets from :mod:`kdloss.sparse`); the student has full-vocabulary logits.
Defaults are DistillKit's ``missing_probability_handling: zero``: teacher power-transformed and
renormalised over its k ids, full-vocabulary student log-softmax, ``× T²``, mean over counted rows.
The whole stack: ``kdloss/_ops/topk_kl.py`` (op schemas, fakes, autograd), ``csrc/cpu/topk_kl.cpp``,
``csrc/cuda/topk_kl*.cu|cpp``, ``kdloss/reference/topk_kl.py``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from . import _ops
from ._dispatch import use_kernel
from ._validation import BACKENDS, REDUCTIONS, accumulation_dtype, check_option, check_same_device, check_tensor
from .reference.topk_kl import teacher_log_targets, topk_kl_reference

__all__ = ["topk_kl_loss", "TopKKLLoss"]

LOSS = "topk_kl"
VALUES = ("logprobs", "logits")
TAILS = ("renorm", "bucket", "none")
SUPPORTS = ("full", "topk")
INDEX_DTYPES = (torch.int64, torch.int32)


def check_positive(value, name: str) -> float:
    """``value`` must be a finite real number > 0."""
    # a chained comparison (not math.isfinite) so that torch.compile's symbolic floats pass too
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_index_tensor(value, name: str) -> torch.Tensor:
    """``value`` must be an int64 or int32 tensor."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be an integer tensor (int64 or int32), got dtype {value.dtype}")
    return value


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)


def check_options(*, values, tail, student_support, temperature, teacher_temperature, scale_by_t2,
                  ignore_index, reduction) -> None:
    """Validates the non-tensor options of :func:`topk_kl_loss` (shared with the module and the
    fused-linear variant)."""
    check_option(values, "values", VALUES)
    check_option(tail, "tail", TAILS)
    check_option(student_support, "student_support", SUPPORTS)
    check_option(reduction, "reduction", REDUCTIONS)
    check_positive(temperature, "temperature")
    check_positive(teacher_temperature, "teacher_temperature")
    _check_bool(scale_by_t2, "scale_by_t2")
    _check_int(ignore_index, "ignore_index")
    if values == "logits" and tail != "renorm":
        raise ValueError(
            f"tail must be 'renorm' when values='logits' (a softmax over the kept logits has no "
            f"residual mass), got {tail!r}"
        )
    if student_support == "topk" and tail == "bucket":
        raise ValueError("tail must not be 'bucket' with student_support='topk' (the student has no tail there)")


def check_num_items(num_items_in_batch, reduction: str, device: torch.device):
    """``num_items_in_batch``: None, an int ≥ 0, or a one-element real tensor; only with "mean"."""
    if num_items_in_batch is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch divides the summed loss, so it needs reduction='mean', got {reduction!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.dtype.is_complex or num_items_in_batch.dtype == torch.bool:
            raise ValueError(
                f"num_items_in_batch must be an int or a one-element real tensor, got a "
                f"{num_items_in_batch.dtype} tensor of shape {tuple(num_items_in_batch.shape)}"
            )
        return num_items_in_batch.detach().reshape(()).to(device, non_blocking=True)
    return _check_non_negative_int(num_items_in_batch)


def _check_non_negative_int(value) -> int:
    if _check_int(value, "num_items_in_batch") < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {value}")
    return int(value)


def check_teacher_tensors(teacher_ids, teacher_values, labels, lead: tuple, names=("student_logits", "[..., V]")):
    """Shapes of the teacher tensors and labels against the student's leading dims ``lead``."""
    check_index_tensor(teacher_ids, "teacher_ids")
    check_tensor(teacher_values, "teacher_values")
    owner, pattern = names
    if teacher_ids.dim() != len(lead) + 1 or tuple(teacher_ids.shape[:-1]) != lead:
        raise ValueError(
            f"teacher_ids must be [..., k] with the leading dims {lead} of {owner} {pattern}, "
            f"got shape {tuple(teacher_ids.shape)}"
        )
    if teacher_ids.shape[-1] == 0:
        raise ValueError("teacher_ids must hold at least one id per position, got k = 0")
    if teacher_values.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher_values must have the shape of teacher_ids {tuple(teacher_ids.shape)}, "
            f"got {tuple(teacher_values.shape)}"
        )
    if labels is not None:
        check_index_tensor(labels, "labels")
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must have the leading dims {lead} of {owner} {pattern}, got shape {tuple(labels.shape)}")


def check_teacher_values_data(teacher_ids, teacher_values, labels, vocab: int, ignore_index: int) -> None:
    """Data-dependent checks (one host sync; skipped while ``torch.compile`` traces): ids in
    ``[0, V)``, no id repeated with non-zero teacher mass in a row, labels in ``[0, V)`` or
    ``ignore_index``."""
    if torch.compiler.is_compiling() or teacher_ids.numel() == 0:
        return
    k = teacher_ids.shape[-1]
    ids = teacher_ids.reshape(-1, k).long()
    bad_range = ((ids < 0) | (ids >= vocab)).any()
    has_mass = teacher_values.reshape(-1, k) != float("-inf")
    # massless slots get distinct negative keys so that only ids carrying mass can collide
    keys = torch.where(has_mass, ids, -1 - torch.arange(k, device=ids.device))
    sorted_keys = keys.sort(dim=-1).values
    duplicate = (sorted_keys[:, 1:] == sorted_keys[:, :-1]).any()
    bad_labels = torch.zeros((), dtype=torch.bool, device=ids.device)
    if labels is not None:
        bad_labels = ((labels != ignore_index) & ((labels < 0) | (labels >= vocab))).any()
    flags = torch.stack([bad_range, duplicate, bad_labels]).tolist()
    if flags[0]:
        raise ValueError(f"teacher_ids must lie in [0, V) with V = {vocab}, got min {ids.min().item()}, max {ids.max().item()}")
    if flags[1]:
        raise ValueError(
            "teacher_ids must be unique within each position among slots with non-zero teacher mass "
            "(a repeated id double-counts; pad with any id and a -inf value instead)"
        )
    if flags[2]:
        raise ValueError(f"labels must lie in [0, V) with V = {vocab} or equal ignore_index = {ignore_index}")


def prepare_teacher(teacher_ids, teacher_values, labels, rows: int, *, values, tail, temperature,
                    teacher_temperature, ignore_index, acc, device):
    """The op-level teacher side (spec §3.1): ids ``[N, k]`` int64, ``log p̂ [N, k]`` and
    ``log r̂ [N]`` in ``acc``, and the ``valid [N]`` row mask."""
    k = teacher_ids.shape[-1]
    ids = teacher_ids.reshape(rows, k).to(torch.int64).contiguous()
    log_p, log_r = teacher_log_targets(
        teacher_values.reshape(rows, k).to(acc), values=values, tail=tail, power=teacher_temperature / temperature
    )
    if labels is None:
        valid = torch.ones(rows, dtype=torch.bool, device=device)
    else:
        valid = (labels.reshape(rows) != ignore_index).contiguous()
    return ids, log_p.contiguous(), log_r.contiguous(), valid


def mean_divisor(valid: torch.Tensor, num_items, acc: torch.dtype) -> torch.Tensor:
    """The ``"mean"`` denominator as a 0-d ``acc`` tensor on ``valid``'s device (no host sync)."""
    if num_items is None:
        return valid.sum().to(acc)
    if isinstance(num_items, torch.Tensor):
        return num_items.to(acc)
    return torch.tensor(float(num_items), dtype=acc, device=valid.device)


def topk_kl_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    values: str = "logprobs",
    tail: str = "renorm",
    student_support: str = "full",
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """KL(teacher ‖ student) with a sparse top-k teacher over a large vocabulary (spec §3).

    Args:
        student_logits: ``[..., V]`` student logits (fp32/bf16/fp16/fp64). Read through strides;
            copied only if the vocabulary dimension is not unit-stride.
        teacher_ids: ``[..., k]`` int64/int32 vocabulary ids, unique per position among slots with
            non-zero teacher mass (pad with any id and a ``-inf`` value).
        teacher_values: ``[..., k]`` teacher log-probabilities (``values="logprobs"``, full-softmax
            log-probs at generation temperature ``teacher_temperature``) or logits
            (``values="logits"``); ``-inf`` means probability 0 and gives finite results.
        labels: optional ``[...]`` int labels aligned with the logits (position t's label is the
            target of position t's logits: shift before calling); rows equal to ``ignore_index``
            do not count. Only the mask is used — there is no hard-label CE term.
        values: ``"logprobs"`` (default) or ``"logits"``.
        tail: ``"renorm"`` (default; DistillKit "zero": teacher renormalised over its ids),
            ``"bucket"`` (DistillKit "symmetric_uniform": the residual teacher mass is one more
            outcome matched to the student's mass outside the ids) or ``"none"`` (teacher mass
            used as is, unnormalised: the biased "Top-K KD", and the form for RS-KD sampled
            targets from :func:`kdloss.sparse.sample_teacher_targets`). ``"logits"`` needs ``"renorm"``.
        student_support: ``"full"`` (default; student log-softmax over V) or ``"topk"`` (student
            renormalised over the teacher's ids; zero gradient elsewhere).
        temperature: distillation temperature T (default 1.0): the student softmax is of
            ``logits / T``, the teacher is re-tempered with the power transform ``p^(T_g/T)``.
        teacher_temperature: temperature T_g at which the stored values were generated (1.0).
        scale_by_t2: multiply by ``T²`` (default True, DistillKit; Liger does not).
        ignore_index: label value of rows that do not count (-100).
        reduction: ``"mean"`` (default: sum over counted rows / their number), ``"sum"`` or
            ``"none"`` (``[...]``, 0 at ignored rows).
        num_items_in_batch: with ``"mean"``, divide the sum by this count instead (an int or a
            one-element tensor, e.g. a global token count under gradient accumulation or DDP).
            A count ≤ 0 gives 0.
        backend: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Returns:
        The loss in ``student_logits.dtype``: a scalar, or ``[...]`` for ``reduction="none"``.
        No row counts → 0 with a zero gradient. Gradients flow to ``student_logits`` only.
    """
    check_tensor(student_logits, "student_logits")
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits must be [..., V] with V >= 1, got shape {tuple(student_logits.shape)}")
    check_options(values=values, tail=tail, student_support=student_support, temperature=temperature,
                  teacher_temperature=teacher_temperature, scale_by_t2=scale_by_t2, ignore_index=ignore_index,
                  reduction=reduction)
    lead = tuple(student_logits.shape[:-1])
    check_teacher_tensors(teacher_ids, teacher_values, labels, lead)
    tensors = {"student_logits": student_logits, "teacher_ids": teacher_ids, "teacher_values": teacher_values}
    if labels is not None:
        tensors["labels"] = labels
    device = check_same_device(**tensors)
    num_items = check_num_items(num_items_in_batch, reduction, device)
    vocab = student_logits.shape[-1]
    check_teacher_values_data(teacher_ids, teacher_values, labels, vocab, ignore_index)
    options = dict(values=values, tail=tail, student_support=student_support, temperature=float(temperature),
                   teacher_temperature=float(teacher_temperature), scale_by_t2=scale_by_t2,
                   ignore_index=ignore_index, reduction=reduction)
    if not use_kernel(LOSS, device, backend):
        return topk_kl_reference(student_logits, teacher_ids, teacher_values, labels, num_items_in_batch=num_items,
                                 **options)
    acc = accumulation_dtype(student_logits.dtype)
    logits = student_logits.reshape(-1, vocab)
    if vocab > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    ids, log_p, log_r, valid = prepare_teacher(
        teacher_ids, teacher_values, labels, logits.shape[0], values=values, tail=tail, temperature=temperature,
        teacher_temperature=teacher_temperature, ignore_index=ignore_index, acc=acc, device=device,
    )
    loss, _ = torch.ops.kdloss.topk_kl_fwd(
        logits, ids, log_p, log_r, valid, mean_divisor(valid, num_items, acc), 1.0 / float(temperature),
        float(temperature) ** 2 if scale_by_t2 else 1.0, student_support == "full", _ops.REDUCTION_CODES[reduction],
    )
    return loss.reshape(lead) if reduction == "none" else loss


class TopKKLLoss(nn.Module):
    """Module form of :func:`topk_kl_loss` (same keywords, same defaults).

    ``TopKKLLoss(temperature=2.0)(student_logits, teacher_ids, teacher_values, labels)``;
    ``forward`` also takes ``num_items_in_batch``.
    """

    def __init__(
        self,
        *,
        values: str = "logprobs",
        tail: str = "renorm",
        student_support: str = "full",
        temperature: float = 1.0,
        teacher_temperature: float = 1.0,
        scale_by_t2: bool = True,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_options(values=values, tail=tail, student_support=student_support, temperature=temperature,
                      teacher_temperature=teacher_temperature, scale_by_t2=scale_by_t2, ignore_index=ignore_index,
                      reduction=reduction)
        self.values, self.tail, self.student_support = values, tail, student_support
        self.temperature, self.teacher_temperature = float(temperature), float(teacher_temperature)
        self.scale_by_t2, self.ignore_index, self.reduction = scale_by_t2, ignore_index, reduction
        self.backend = check_option(backend, "backend", BACKENDS)

    def options(self) -> dict:
        """The keyword arguments passed to :func:`topk_kl_loss`."""
        return dict(values=self.values, tail=self.tail, student_support=self.student_support,
                    temperature=self.temperature, teacher_temperature=self.teacher_temperature,
                    scale_by_t2=self.scale_by_t2, ignore_index=self.ignore_index, reduction=self.reduction,
                    backend=self.backend)

    def forward(self, student_logits, teacher_ids, teacher_values, labels=None, num_items_in_batch=None):
        return topk_kl_loss(student_logits, teacher_ids, teacher_values, labels,
                            num_items_in_batch=num_items_in_batch, **self.options())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())
