"""Top-k sparse KL over a large vocabulary: :func:`topk_kl_loss` and :class:`TopKKLLoss`.

The teacher comes as its top-k per position (ids plus log-probs or logits, as DistillKit stores them, or
sampled RS-KD targets from :mod:`kdloss.sparse`); the student has full-vocabulary logits. Per counted
position, with student logits ``z ∈ R^V``, teacher targets ``p̂`` on the kept ids ``K`` (see
:mod:`kdloss._topk` for how they are formed from the stored values) and ``log q = log_softmax(z / T)``:

    KL = Σ_{j∈K} p̂_j (log p̂_j − log q_j)  [+ r̂ (log r̂ − log(1 − Σ_K q))  with tail="bucket"]

with xlogy semantics (a slot of zero teacher mass contributes nothing), times ``T²`` with
``scale_by_t2``, then reduced over counted positions. Defaults reproduce DistillKit's
``missing_probability_handling: zero`` (teacher renormalised over its k ids, full-vocabulary student,
``× T²``, mean over counted positions).
"""

from __future__ import annotations

import torch

from . import _ops
from ._autocast import cast_loss
from ._dispatch import use_kernel
from ._options import OptionsModule
from ._topk import (
    TopKKLOptions,
    check_teacher,
    check_teacher_data,
    target_dtype,
    teacher_targets,
    temperature_args,
)
from ._validation import (
    accumulation_dtype,
    check_bool,
    check_label_values,
    check_num_items,
    check_same_device,
    check_tensor,
    has_data,
    mean_divisor,
)
from ._vocab_parallel import is_dtensor, topk_kl_vocab_parallel

__all__ = ["TopKKLLoss", "TopKKLOptions", "topk_kl_loss"]

_D = TopKKLOptions  # defaults are the dataclass's


def _check_logits(student_logits) -> int:
    check_tensor(student_logits, "student_logits")
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits must be [..., V] with V >= 1, got shape {tuple(student_logits.shape)}")
    return student_logits.shape[-1]


def topk_kl_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    values: str = _D.values,
    tail: str = _D.tail,
    student_support: str = _D.student_support,
    temperature: float = _D.temperature,
    teacher_temperature: float = _D.teacher_temperature,
    scale_by_t2: bool = _D.scale_by_t2,
    ignore_index: int = _D.ignore_index,
    reduction: str = _D.reduction,
    num_items_in_batch: int | torch.Tensor | None = None,
    backend: str = "auto",
    vocab_parallel_group=None,
    precompute_grad: bool | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """KL(teacher ‖ student) with a sparse top-k teacher over a large vocabulary.

    Args:
        student_logits: ``[..., V]`` student logits (fp32/bf16/fp16/fp64). Read through strides, the
            label-shift slice ``logits[:, :-1]`` of ``[B, T + 1, V]`` logits included; copied only if the
            vocabulary dimension is not unit-stride (or more than two leading dims do not flatten).
        teacher_ids: ``[..., k]`` integer vocabulary ids (int64/int32/int16/uint16/int8/uint8), unique per
            position among slots with non-zero teacher mass (pad with any id and a ``-inf`` value).
        teacher_values: ``[..., k]`` teacher log-probabilities (``values="logprobs"``: full-softmax log-probs
            at generation temperature ``teacher_temperature``) or logits (``values="logits"``); ``-inf``
            means probability 0 and gives finite results.
        labels: optional ``[...]`` integer labels aligned with the logits (position t's label is the target
            of position t's logits: shift before calling); positions equal to ``ignore_index`` do not
            count. Only the mask is used — there is no hard-label cross-entropy term.
        values: ``"logprobs"`` (default) or ``"logits"``.
        tail: ``"renorm"`` (default: teacher renormalised over its ids), ``"bucket"`` (the residual
            teacher mass is one more outcome, matched to the student's mass outside the ids) or
            ``"none"`` (teacher mass used as is: biased top-k KD, and the form for RS-KD sampled targets
            from :func:`kdloss.sparse.sample_teacher_targets`). ``values="logits"`` needs ``"renorm"``.
        student_support: ``"full"`` (default; student log-softmax over V) or ``"topk"`` (student
            renormalised over the teacher's ids; zero gradient elsewhere).
        temperature: distillation temperature T (default 1.0): the student softmax is of ``logits / T``,
            the teacher is re-tempered with the power transform ``p^(T_g/T)``.
        teacher_temperature: temperature T_g at which the stored values were generated (default 1.0).
        scale_by_t2: multiply by ``T²`` (default True, as DistillKit; Liger and TRL do not).
        ignore_index: label value of positions that do not count (default -100).
        reduction: ``"mean"`` (default: sum over counted positions / their number), ``"sum"`` or
            ``"none"`` (``[...]``, 0 at ignored positions).
        num_items_in_batch: with ``"mean"``, divide the sum by this count instead (an int or a one-element
            tensor: e.g. the global token count under gradient accumulation, or
            :func:`kdloss.distributed.num_items_for_ddp` under data parallelism). A count ≤ 0 gives 0.
        backend: ``"auto"`` (kernel, or the pure-PyTorch reference with one warning if the kernel cannot
            be built), ``"kernel"`` or ``"reference"``.
        vocab_parallel_group: vocabulary parallelism (default None: off). A ``torch.distributed`` process
            group (or 1-D ``DeviceMesh``) over which the vocabulary is split: ``student_logits`` is then
            this rank's contiguous shard ``[..., V_r]`` (shards in group-rank order, sizes may differ),
            the teacher ids and labels are global, and every rank of the group passes the same rows and
            teacher. The loss is the full-vocabulary loss (the same on every rank) and the gradient is
            its gradient w.r.t. this shard; nothing of size V is communicated. A ``DTensor`` sharded on
            its last dimension is handled this way with its mesh's group. See docs/topk_kl.md.
        precompute_grad: when the logits need a gradient, compute it in the forward, in the same pass over
            the logits as the loss, and hold it until the backward (which returns it as is for an upstream
            gradient of exactly 1 and otherwise scales it); ``False`` holds only two floats per row and
            recomputes the gradient in the backward (a second read of the logits). Default (None): True, but
            False for float16 logits (the held gradient is in the logits' dtype and unscaled: at a small
            temperature it may exceed float16's range, 65504, before the upstream factor brings it back, where
            the two-pass path applies that factor first). On CUDA the backward scales the held gradient in
            place on the device (rows whose factor is exactly 1 are skipped, no host sync) and hands it over,
            so a second backward through the same graph (``retain_graph=True``) raises: pass False for that.
            A forward without gradient never writes anything of size N×V. See docs/topk_kl.md, Memory.
        validate: check the data of ``teacher_ids`` (in ``[0, V)``, unique among slots with teacher mass) and
            ``labels`` (default True). On CPU the id checks run inside the kernel at no extra pass; on CUDA
            they cost a host synchronisation, which ``validate=False`` skips for hot loops: ids outside
            ``[0, V)`` then contribute nothing and a repeated id counts once per slot.

    Shape:
        ``student_logits [..., V]``, ``teacher_ids [..., k]``, ``teacher_values [..., k]``, ``labels [...]``.

    Returns:
        The loss in ``student_logits.dtype`` (fp32 under autocast): a scalar, or ``[...]`` for
        ``reduction="none"``. No counted position gives 0 with a zero gradient. Gradients flow to
        ``student_logits`` only.

    Example:
        >>> logits = torch.randn(2, 5, 100, requires_grad=True)
        >>> teacher = torch.randn(2, 5, 100).log_softmax(-1).topk(8)
        >>> loss = topk_kl_loss(logits, teacher.indices, teacher.values, temperature=2.0)
        >>> loss.backward()

    References:
        Hinton et al., "Distilling the Knowledge in a Neural Network" (2015); Anshumann et al.,
        "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs" (2025); DistillKit.
    """
    options = TopKKLOptions(values=values, tail=tail, student_support=student_support, temperature=temperature,
                            teacher_temperature=teacher_temperature, scale_by_t2=scale_by_t2,
                            ignore_index=ignore_index, reduction=reduction)
    if vocab_parallel_group is not None or is_dtensor(student_logits):
        check_bool(validate, "validate")
        return topk_kl_vocab_parallel(student_logits, teacher_ids, teacher_values, labels, options=options,
                                      num_items_in_batch=num_items_in_batch, backend=backend,
                                      group=vocab_parallel_group, validate=validate)
    vocab = _check_logits(student_logits)
    lead = tuple(student_logits.shape[:-1])
    check_teacher(teacher_ids, teacher_values, labels, lead, "student_logits [..., V]")
    tensors = {"student_logits": student_logits, "teacher_ids": teacher_ids, "teacher_values": teacher_values}
    if labels is not None:
        tensors["labels"] = labels
    device = check_same_device(**tensors)
    num_items = check_num_items(num_items_in_batch, reduction, device)
    check_bool(validate, "validate")
    if precompute_grad is not None:
        check_bool(precompute_grad, "precompute_grad")
    kernel = use_kernel("topk_kl", device, backend)
    # the CPU kernel checks the ids itself, in its pass over the rows
    in_kernel = kernel and device.type == "cpu"
    if validate and not in_kernel:
        check_teacher_data(teacher_ids, teacher_values, labels, vocab, options.ignore_index)
    elif validate:
        check_label_values(labels, vocab, options.ignore_index)
    if not kernel:
        from .reference.topk_kl import topk_kl_reference

        return topk_kl_reference(student_logits, teacher_ids, teacher_values, labels, options=options,
                                 num_items_in_batch=num_items)
    acc = accumulation_dtype(student_logits.dtype)
    logits = kernel_rows(student_logits)
    rows = student_logits.numel() // vocab if vocab else 0
    ids, log_p, log_r, counted = teacher_targets(teacher_ids, teacher_values, labels, rows, options,
                                               target_dtype(student_logits.device, acc))
    wants_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if precompute_grad is None:  # fp16 holds the unscaled gradient only up to 65504: scale first
        precompute_grad = student_logits.dtype != torch.float16
    loss, *_ = torch.ops.kdloss.topk_kl_fwd_grad(
        logits, ids, log_p, log_r, counted, mean_divisor(counted, num_items, acc), *temperature_args(options),
        options.student_support == "full", _ops.REDUCTION_CODES[reduction], wants_grad and precompute_grad,
        validate and in_kernel and has_data(logits),
    )
    return cast_loss(loss.reshape(lead) if reduction == "none" else loss, student_logits.dtype)


def kernel_rows(student_logits: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` logits as the kernels read them, without a copy where the strides allow: ``[N, V]``
    when the leading dims flatten to one stride, else ``[B, T, V]`` (e.g. the label-shift slice
    ``full[:, :-1]``, whose batch stride is not ``T`` rows); a copy only when V is not unit-stride or the
    dims before the last two do not flatten."""
    vocab = student_logits.shape[-1]
    if vocab > 1 and student_logits.stride(-1) != 1:
        return student_logits.reshape(-1, vocab).contiguous()
    try:
        return student_logits.view(-1, vocab)
    except RuntimeError:
        pass
    try:
        return student_logits.view(-1, student_logits.shape[-2], vocab)
    except RuntimeError:
        return student_logits.reshape(-1, vocab).contiguous()


class TopKKLLoss(OptionsModule):
    """Module form of :func:`topk_kl_loss`: options in ``__init__``, tensors in ``forward``.

    Every option is an attribute that can be changed between calls (``loss_fn.temperature = 2.0``); it is
    validated on assignment.

    Args:
        values, tail, student_support, temperature, teacher_temperature, scale_by_t2, ignore_index,
        reduction, backend: as in :func:`topk_kl_loss`.
        vocab_parallel_group, precompute_grad, validate: as in :func:`topk_kl_loss`; plain attributes
            (runtime choices, not loss options).

    Shape:
        ``forward(student_logits [..., V], teacher_ids [..., k], teacher_values [..., k], labels [...] = None,
        *, num_items_in_batch=None)`` → a scalar, or ``[...]`` for ``reduction="none"``.

    Example:
        >>> kd = TopKKLLoss(temperature=2.0)
        >>> logits = torch.randn(4, 100, requires_grad=True)
        >>> top = torch.randn(4, 100).log_softmax(-1).topk(8)
        >>> kd(logits, top.indices, top.values).backward()
    """

    def __init__(
        self,
        *,
        values: str = _D.values,
        tail: str = _D.tail,
        student_support: str = _D.student_support,
        temperature: float = _D.temperature,
        teacher_temperature: float = _D.teacher_temperature,
        scale_by_t2: bool = _D.scale_by_t2,
        ignore_index: int = _D.ignore_index,
        reduction: str = _D.reduction,
        backend: str = "auto",
        vocab_parallel_group=None,
        precompute_grad: bool | None = None,
        validate: bool = True,
    ) -> None:
        options = TopKKLOptions(values=values, tail=tail, student_support=student_support, temperature=temperature,
                                teacher_temperature=teacher_temperature, scale_by_t2=scale_by_t2,
                                ignore_index=ignore_index, reduction=reduction)
        super().__init__(options, backend)
        self.vocab_parallel_group = vocab_parallel_group
        self.precompute_grad = precompute_grad
        self.validate = validate

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_ids: torch.Tensor,
        teacher_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See :func:`topk_kl_loss`."""
        return topk_kl_loss(student_logits, teacher_ids, teacher_values, labels,
                            num_items_in_batch=num_items_in_batch, backend=self.backend,
                            vocab_parallel_group=self.vocab_parallel_group, precompute_grad=self.precompute_grad,
                            validate=self.validate, **self.option_kwargs())
