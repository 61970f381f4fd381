"""Knowledge distillation of causal language models with Hugging Face ``transformers``.

Two teachers and two student heads, in any combination:

* **online teacher**: a teacher model runs on the same batch; its top-k ids and log-probs per
  position come from :func:`kdloss.sparse.topk_teacher`;
* **stored top-k targets**: the dataset carries ``teacher_ids`` / ``teacher_values`` columns of
  shape ``[T, k]`` per sequence (position ``t`` holds the teacher's distribution over token
  ``t + 1``, aligned with the student's logits at ``t``);
* **plain head**: the student's logits ``[B, T, V]`` go to :func:`kdloss.functional.topk_kl_loss`;
* **fused head** (``DistillationConfig(fused=True)``): the student's last hidden states and its
  output embedding go to :func:`kdloss.functional.fused_linear_topk_kl_loss`, so the ``[B, T, V]``
  logits never exist.

Use :class:`KDTrainer` (a ``transformers.Trainer``), or call :func:`distillation_loss` from your own
``compute_loss``. Both normalise by the number of counted label tokens of the whole optimizer step
on all processes, so gradient accumulation and DDP give the gradient of one global mean.

The loss is ``(1 − ce_weight) · KD + ce_weight · CE`` where KD is the top-k KL (× T² by default)
and CE the hard-label cross-entropy at temperature 1, both averaged over the same counted tokens;
``ce_weight = 0`` (default) skips the CE.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import weakref
from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "kdloss.integrations.transformers needs Hugging Face transformers: "
        "pip install 'kdloss[transformers]' (or pip install transformers accelerate)"
    ) from error

from .._topk import TopKKLOptions
from .._validation import BACKENDS, check_bool, check_int, check_option, check_real
from ..fused_linear_topk_kl import fused_linear_topk_kl_loss
from ..sparse import topk_teacher
from ..topk_kl import topk_kl_loss

__all__ = [
    "DistillationConfig",
    "DistillationOutput",
    "DistillationCollator",
    "KDTrainer",
    "distillation_loss",
    "shifted_labels",
    "unwrap_model",
]

#: Logits computed at once when the teacher's top-k is taken from its hidden states (fused path).
_TEACHER_CHUNK_ELEMENTS = 1 << 24
_NON_MODEL_KEYS = ("labels", "shift_labels", "num_items_in_batch")


@dataclasses.dataclass
class DistillationConfig:
    """Options of :func:`distillation_loss` and :class:`KDTrainer`.

    Args:
        temperature: distillation temperature T (default 1.0), applied to both sides.
        scale_by_t2: multiply the KD term by T² (default True; Liger and TRL do not).
        tail, student_support: as in :func:`kdloss.functional.topk_kl_loss` (default
            ``"renorm"``, ``"full"``).
        top_k: ids kept per position from an online teacher (default 64; capped at V).
        values, teacher_temperature: what the stored teacher values are (``"logprobs"`` or
            ``"logits"``) and the temperature they were generated at (default 1.0). Ignored for an
            online teacher, whose targets are full-softmax log-probs at temperature 1.
        ce_weight: weight w of the hard-label cross-entropy: ``loss = (1 − w)·KD + w·CE``
            (default 0.0: pure distillation, CE not computed). CE uses temperature 1.
        fused: use the fused LM head (default False): the student's logits are never built.
        chunk_size: rows per chunk of the fused head (default: kdloss's choice).
        ignore_index: label value of positions that do not count (-100).
        teacher_ids_column, teacher_values_column: names of the stored-target columns
            (``"teacher_ids"``, ``"teacher_values"``).
        backend: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Example:
        >>> config = DistillationConfig(temperature=2.0, fused=True, ce_weight=0.1)
    """

    temperature: float = 1.0
    scale_by_t2: bool = True
    tail: str = "renorm"
    student_support: str = "full"
    top_k: int = 64
    values: str = "logprobs"
    teacher_temperature: float = 1.0
    ce_weight: float = 0.0
    fused: bool = False
    chunk_size: int | None = None
    ignore_index: int = -100
    teacher_ids_column: str = "teacher_ids"
    teacher_values_column: str = "teacher_values"
    backend: str = "auto"

    def __post_init__(self) -> None:
        TopKKLOptions(values=self.values, tail=self.tail, student_support=self.student_support,
                      temperature=self.temperature, teacher_temperature=self.teacher_temperature,
                      scale_by_t2=self.scale_by_t2, ignore_index=self.ignore_index)
        check_real(self.ce_weight, "ce_weight", low=0.0, high=1.0, low_open=False, high_open=False)
        check_int(self.top_k, "top_k", low=1)
        check_bool(self.fused, "fused")
        if self.chunk_size is not None:
            check_int(self.chunk_size, "chunk_size", low=1)
        for name in ("teacher_ids_column", "teacher_values_column"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {getattr(self, name)!r}")
        check_option(self.backend, "backend", BACKENDS)

    @property
    def teacher_columns(self) -> tuple[str, str]:
        """The two stored-target column names (keep them when ``remove_unused_columns`` is on)."""
        return self.teacher_ids_column, self.teacher_values_column


@dataclasses.dataclass
class DistillationOutput:
    """What :func:`distillation_loss` computed (``return_outputs=True``).

    ``loss = (1 − w)·kd_loss + w·ce_loss`` exactly; ``kd_loss`` and ``ce_loss`` carry the same
    normalisation as ``loss``. ``ce_loss`` is None when ``ce_weight == 0``. ``student_outputs`` is
    the student model's output (its ``logits`` are ``[B, 1, V]`` on the fused path).
    """

    loss: torch.Tensor
    kd_loss: torch.Tensor
    ce_loss: torch.Tensor | None
    student_outputs: Any


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / FSDP / DataParallel / ``torch.compile`` wrappers.

    Use it only to read attributes (config, output embedding); run the forward through the wrapper
    so that DDP synchronises gradients and the compiled graph is used.

    Example:
        >>> core = unwrap_model(torch.compile(model))   # the model itself
    """
    for _ in range(16):
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if not isinstance(inner, nn.Module) and not hasattr(model, "get_output_embeddings"):
            inner = getattr(model, "module", None)  # DDP, FSDP, DataParallel, DeepSpeed
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _explicit_forward_args(core: nn.Module) -> frozenset[str]:
    """Named arguments of the model's forward (of the base model under a PEFT wrapper, which
    passes unknown keywords through)."""
    base = core.get_base_model() if callable(getattr(core, "get_base_model", None)) else core
    try:
        parameters = inspect.signature(base.forward).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


class _Head:
    """A causal LM's output projection: ``softcap(scale · h @ Wᵀ + b)``."""

    def __init__(self, core: nn.Module, role: str) -> None:
        head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f"the {role} model must be a causal LM whose get_output_embeddings() is a linear layer "
                f"(got {type(head).__name__}); the fused head needs its weight"
            )
        config = getattr(core, "config", None)
        self.weight = weight
        self.bias = getattr(head, "bias", None)
        softcap = getattr(config, "final_logit_softcapping", None)
        self.softcap = float(softcap) if softcap else None
        scale = 1.0
        if isinstance(getattr(config, "logit_scale", None), numbers.Real):  # Cohere multiplies the logits
            scale *= float(config.logit_scale)
        if isinstance(getattr(config, "logits_scaling", None), numbers.Real):  # Granite divides them
            scale /= float(config.logits_scaling)
        self.scale = scale

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def prepare_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.scale == 1.0 else hidden * self.scale

    def logits(self, hidden: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
        vocab = self.vocab if vocab is None else vocab
        weight = self.weight[:vocab]
        bias = None if self.bias is None else self.bias[:vocab]
        h = self.prepare_hidden(hidden)
        z = torch.nn.functional.linear(h.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)


_VERIFIED_HEADS: weakref.WeakSet = weakref.WeakSet()


def _verify_head(core: nn.Module, head: _Head, hidden: torch.Tensor, logits, role: str) -> None:
    """Once per model: the last position's logits must equal the head applied to the last hidden
    state, so that a model whose head is not a plain linear layer never trains silently wrong."""
    if core in _VERIFIED_HEADS or torch.compiler.is_compiling():
        return
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or logits.shape[-2] == 0 or hidden.shape[-2] == 0:
        return
    with torch.no_grad():
        expected = head.logits(hidden[..., -1, :]).float()
        actual = logits[..., -1, :].float()
        if actual.shape != expected.shape:
            return
        error = (expected - actual).abs().max()
        # loose enough for bf16/fp16 autocast (relative rounding 2^-8), tight enough for any other head
        bound = 0.03 * torch.maximum(expected.abs().max(), actual.abs().max()) + 1e-5
        if not bool(error <= bound):
            raise ValueError(
                f"the {role} model's logits are not softcap(scale · hidden_states[-1] @ W.T + b) with W its "
                f"get_output_embeddings() (max difference {float(error):.3g}); the fused head cannot reproduce "
                f"this model's head — use DistillationConfig(fused=False)"
            )
    _VERIFIED_HEADS.add(core)


def shifted_labels(inputs, ignore_index: int = -100) -> torch.Tensor:
    """Labels aligned with the logits: position t's logits predict ``labels[t + 1]``.

    ``inputs["shift_labels"]`` is used as is when present; otherwise ``labels[..., 1:]`` padded
    with ``ignore_index`` at the end (a copy of the small integer tensor only: logits and hidden
    states are never sliced or copied).

    Example:
        >>> shifted_labels({"labels": torch.tensor([[5, 6, 7]])})
        tensor([[   6,    7, -100]])
    """
    if "shift_labels" in inputs and inputs["shift_labels"] is not None:
        return inputs["shift_labels"]
    labels = inputs.get("labels") if hasattr(inputs, "get") else None
    if not isinstance(labels, torch.Tensor):
        raise ValueError(
            "inputs must hold 'labels' (token ids, ignore_index at positions that do not count) or "
            "'shift_labels'; DistillationCollator builds them from input_ids"
        )
    pad = labels.new_full((*labels.shape[:-1], 1), ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def _model_inputs(inputs, config: DistillationConfig) -> dict:
    skip = set(_NON_MODEL_KEYS) | set(config.teacher_columns)
    return {key: value for key, value in inputs.items() if key not in skip}


def _forward(model: nn.Module, core: nn.Module, model_inputs: dict, *, hidden: bool) -> Any:
    """Runs ``model`` (the wrapper, so DDP/compile see the call). With ``hidden`` it asks for the
    hidden states and for the logits of the last position only."""
    accepted = _explicit_forward_args(core)
    extra = {}
    if "use_cache" in accepted:
        extra["use_cache"] = False
    if hidden:
        extra["output_hidden_states"] = True
        if "logits_to_keep" in accepted:
            extra["logits_to_keep"] = 1
        elif "num_logits_to_keep" in accepted:
            extra["num_logits_to_keep"] = 1
    outputs = model(**model_inputs, **extra)
    if hidden and not getattr(outputs, "hidden_states", None):
        raise ValueError(f"{type(core).__name__} returned no hidden_states with output_hidden_states=True")
    return outputs


def _stored_targets(inputs, config: DistillationConfig, length: int):
    ids_name, values_name = config.teacher_columns
    missing = [name for name in (ids_name, values_name) if name not in inputs]
    if missing:
        raise ValueError(
            f"the batch has no {' / '.join(repr(m) for m in missing)} column: pass teacher_model= for an online "
            f"teacher, or keep the stored targets in the batch — Trainer drops columns its model does not take "
            f"unless TrainingArguments(remove_unused_columns=False) or KDTrainer is used"
        )
    ids, values = inputs[ids_name], inputs[values_name]
    if not isinstance(ids, torch.Tensor) or not isinstance(values, torch.Tensor) or ids.dim() < 2:
        raise ValueError(f"{ids_name!r} and {values_name!r} must be [B, T, k] tensors (use DistillationCollator)")
    if ids.shape[-2] == length - 1:  # targets stored for the T - 1 predicting positions only
        ids = torch.nn.functional.pad(ids, (0, 0, 0, 1), value=0)
        values = torch.nn.functional.pad(values, (0, 0, 0, 1), value=float("-inf"))
    return ids, values, config.values, config.teacher_temperature


@torch.no_grad()
def _online_targets(teacher_model: nn.Module, model_inputs: dict, config: DistillationConfig, vocab: int):
    """Top-k ids and full-softmax log-probs of an online teacher, restricted to the student's
    vocabulary (a teacher with a larger, padded vocabulary is truncated to the first V ids)."""
    core = unwrap_model(teacher_model)
    if config.fused:
        outputs = _forward(teacher_model, core, model_inputs, hidden=True)
        head = _Head(core, "teacher")
        hidden = outputs.hidden_states[-1]
        _verify_head(core, head, hidden, getattr(outputs, "logits", None), "teacher")
        ids, logprobs = _topk_from_hidden(hidden, head, min(config.top_k, vocab, head.vocab), min(vocab, head.vocab))
    else:
        logits = _forward(teacher_model, core, model_inputs, hidden=False).logits
        logits = logits[..., :vocab]
        ids, logprobs = topk_teacher(logits, min(config.top_k, logits.shape[-1]))
    return ids, logprobs, "logprobs", 1.0


def _topk_from_hidden(hidden: torch.Tensor, head: _Head, k: int, vocab: int):
    """``topk_teacher`` of the head's logits, a bounded slice of rows at a time."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids = torch.empty(flat.shape[0], k, dtype=torch.int64, device=flat.device)
    logprobs = torch.empty(flat.shape[0], k, dtype=torch.float32, device=flat.device)
    step = max(1, _TEACHER_CHUNK_ELEMENTS // vocab)
    for start in range(0, flat.shape[0], step):
        end = min(flat.shape[0], start + step)
        ids[start:end], chunk_logprobs = topk_teacher(head.logits(flat[start:end], vocab), k)
        logprobs[start:end] = chunk_logprobs
    return ids.reshape(*hidden.shape[:-1], k), logprobs.reshape(*hidden.shape[:-1], k)


def _distributed_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _trainer_scales_for_ga(trainer, num_items_in_batch) -> bool:
    """Whether ``Trainer.training_step`` uses the loss as is (True) or divides it by the number of
    accumulation steps (False), following the Trainer's own rule."""
    flag = getattr(trainer, "loss_is_scaled_for_ga", None)
    if flag is None:
        flag = bool(getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
            getattr(trainer, "compute_loss_func", None) is not None
        )
    return bool(flag)


def _normalisation(num_items_in_batch, labels: torch.Tensor, ignore_index: int, trainer, training: bool):
    """``(divisor, factor)``: the loss is ``factor · Σ terms / divisor`` (``divisor`` None = local
    count). Makes DDP's gradient averaging and Trainer's accumulation yield the global mean."""
    if num_items_in_batch is None:
        if _distributed_world() > 1:
            from ..distributed import num_items_for_ddp

            return num_items_for_ddp(labels, ignore_index=ignore_index), 1.0
        return None, 1.0
    count = torch.as_tensor(num_items_in_batch, device=labels.device).reshape(()).to(torch.float32)
    if trainer is None:
        return count, 1.0
    # Trainer's count is summed over all processes when average_tokens_across_devices is on; DDP then
    # averages the ranks' gradients, so each rank divides by count / processes (Trainer's own
    # compute_loss multiplies its loss by the number of processes instead, which is the same thing).
    processes = 1
    if getattr(trainer.args, "average_tokens_across_devices", False):
        processes = trainer.accelerator.num_processes
    if processes > 1:
        count = count / processes
    factor = 1.0
    if training and not _trainer_scales_for_ga(trainer, num_items_in_batch):
        factor = float(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1)
    return count, factor


def _kd_options(config: DistillationConfig, values: str, teacher_temperature: float, divisor) -> dict:
    return dict(values=values, tail=config.tail, student_support=config.student_support,
                temperature=config.temperature, teacher_temperature=teacher_temperature,
                scale_by_t2=config.scale_by_t2, ignore_index=config.ignore_index, reduction="mean",
                num_items_in_batch=divisor, backend=config.backend)


def _ce_options(config: DistillationConfig, divisor) -> dict:
    # CE is the top-k KL against a one-hot teacher (k = 1, log-prob 0): −log q_label, at T = 1.
    return dict(values="logprobs", tail="renorm", student_support="full", temperature=1.0,
                teacher_temperature=1.0, scale_by_t2=False, ignore_index=config.ignore_index, reduction="mean",
                num_items_in_batch=divisor, backend=config.backend)


def _one_hot_targets(labels: torch.Tensor, ignore_index: int):
    ids = torch.where(labels == ignore_index, torch.zeros_like(labels), labels).unsqueeze(-1)
    return ids, torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)


def distillation_loss(
    model: nn.Module,
    inputs,
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    teacher_model: nn.Module | None = None,
    config: DistillationConfig | None = None,
    trainer: Trainer | None = None,
    return_outputs: bool = False,
):
    """Distillation loss of a causal LM student on one batch, for your own ``compute_loss``.

    Args:
        model: the student as the training loop holds it — DDP-wrapped, compiled or plain. Its
            forward is run through the wrapper; only its config and output embedding are read from
            the unwrapped model.
        inputs: the batch: ``input_ids``, ``attention_mask`` … (passed to the model), ``labels``
            (``[B, T]``, unshifted, ``ignore_index`` where nothing is predicted; or ``shift_labels``
            already aligned with the logits) and, without ``teacher_model``, the stored targets
            ``[B, T, k]`` (or ``[B, T − 1, k]``) under ``config.teacher_columns``.
        num_items_in_batch: the counted tokens to divide by. Inside ``Trainer.compute_loss`` pass
            the Trainer's value **and** ``trainer=self``: it is then read as Hugging Face's count
            (summed over processes when ``average_tokens_across_devices``) and converted so that DDP's
            gradient averaging and accumulation give the global mean. Without ``trainer`` it is the
            divisor of this process's summed loss as is (e.g. the sum over the accumulated
            micro-batches of :func:`kdloss.distributed.num_items_for_ddp`). None: this batch's
            counted tokens — summed over all processes and divided by their number when
            ``torch.distributed`` is initialised.
        teacher_model: an online teacher (same tokenizer); None uses the stored targets.
        config: :class:`DistillationConfig` (default options when None).
        trainer: the calling ``transformers.Trainer``, when called from its ``compute_loss``.
        return_outputs: also return a :class:`DistillationOutput`.

    Returns:
        The scalar loss ``(1 − w)·KD + w·CE`` (fp32 for fp32 students), or ``(loss, output)``.

    Example:
        >>> class MyTrainer(transformers.Trainer):
        ...     def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ...         return distillation_loss(model, inputs, num_items_in_batch, teacher_model=self.teacher,
        ...                                  config=DistillationConfig(temperature=2.0), trainer=self)
    """
    config = DistillationConfig() if config is None else config
    if not isinstance(config, DistillationConfig):
        raise TypeError(f"config must be a DistillationConfig, got {type(config).__name__}")
    labels = shifted_labels(inputs, config.ignore_index)
    model_inputs = _model_inputs(inputs, config)
    divisor, factor = _normalisation(num_items_in_batch, labels, config.ignore_index, trainer, model.training)
    core = unwrap_model(model)
    if config.fused:
        outputs = _forward(model, core, model_inputs, hidden=True)
        head = _Head(core, "student")
        hidden = outputs.hidden_states[-1]
        _verify_head(core, head, hidden, getattr(outputs, "logits", None), "student")
        vocab = head.vocab
    else:
        outputs = _forward(model, core, model_inputs, hidden=False)
        logits = outputs.logits
        vocab = logits.shape[-1]
    if teacher_model is not None:
        ids, values, kind, teacher_temperature = _online_targets(teacher_model, model_inputs, config, vocab)
    else:
        ids, values, kind, teacher_temperature = _stored_targets(inputs, config, labels.shape[-1])
    kd_options = _kd_options(config, kind, teacher_temperature, divisor)
    ce = None
    if config.fused:
        h = head.prepare_hidden(hidden)
        fused = dict(bias=head.bias, labels=labels, softcap=head.softcap, chunk_size=config.chunk_size)
        kd = fused_linear_topk_kl_loss(h, head.weight, ids, values, **fused, **kd_options)
        if config.ce_weight > 0:
            ce = fused_linear_topk_kl_loss(h, head.weight, *_one_hot_targets(labels, config.ignore_index), **fused,
                                           **_ce_options(config, divisor))
    else:
        kd = topk_kl_loss(logits, ids, values, labels, **kd_options)
        if config.ce_weight > 0:
            ce = topk_kl_loss(logits, *_one_hot_targets(labels, config.ignore_index), labels,
                              **_ce_options(config, divisor))
    if factor != 1.0:
        kd = kd * factor
        ce = None if ce is None else ce * factor
    loss = kd if ce is None else (1.0 - config.ce_weight) * kd + config.ce_weight * ce
    if return_outputs:
        return loss, DistillationOutput(loss=loss, kd_loss=kd, ce_loss=ce, student_outputs=outputs)
    return loss


@dataclasses.dataclass
class DistillationCollator:
    """Pads a list of examples into a batch, teacher columns included.

    Sequence fields are right-padded to the longest example (rounded up to
    ``pad_to_multiple_of``): ``input_ids`` with ``pad_token_id``, ``attention_mask`` with 0,
    ``labels`` / ``shift_labels`` with ``ignore_index``, ``position_ids`` with 0, the teacher ids
    with 0 and the teacher values with ``-inf``. Missing ``labels`` are built from ``input_ids``
    (``ignore_index`` at padding), a missing ``attention_mask`` from the lengths. Other fields are
    stacked with ``torch.tensor``.

    Example:
        >>> collate = DistillationCollator(pad_token_id=0)
        >>> batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
        >>> batch["labels"].tolist()
        [[5, 6, 7], [8, -100, -100]]
    """

    pad_token_id: int = 0
    ignore_index: int = -100
    teacher_ids_column: str = "teacher_ids"
    teacher_values_column: str = "teacher_values"
    pad_to_multiple_of: int | None = None

    def _padding(self) -> dict[str, Any]:
        return {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": self.ignore_index,
                "shift_labels": self.ignore_index, "position_ids": 0, self.teacher_ids_column: 0,
                self.teacher_values_column: float("-inf")}

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features or "input_ids" not in features[0]:
            raise ValueError("DistillationCollator needs a non-empty list of examples with 'input_ids'")
        lengths = [len(f["input_ids"]) for f in features]
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        padding = self._padding()
        batch = {}
        for key in features[0]:
            rows = [torch.as_tensor(f[key]) for f in features]
            if key in padding:
                batch[key] = torch.stack([_pad_rows(row, length, padding[key]) for row in rows])
            else:
                batch[key] = torch.stack(rows)
        positions = torch.arange(length)
        real = positions.unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
        if "attention_mask" not in batch:
            batch["attention_mask"] = real.long()
        if "labels" not in batch and "shift_labels" not in batch:
            batch["labels"] = torch.where(real, batch["input_ids"], torch.full_like(batch["input_ids"],
                                                                                    self.ignore_index))
        return batch


def _pad_rows(row: torch.Tensor, length: int, value) -> torch.Tensor:
    if row.shape[0] >= length:
        return row[:length]
    pad = row.new_full((length - row.shape[0], *row.shape[1:]), value)
    return torch.cat([row, pad])


class KDTrainer(Trainer):
    """A ``transformers.Trainer`` that distils a causal LM student with kdloss.

    Args:
        *args, **kwargs: as for ``transformers.Trainer`` (``model`` is the student).
        teacher_model: an online teacher, moved to the training device, put in eval mode and frozen;
            None (default) reads stored top-k targets from the dataset columns
            ``distillation.teacher_columns``.
        distillation: a :class:`DistillationConfig` (default options when None).

    What it changes in ``Trainer``:

    * ``compute_loss`` is :func:`distillation_loss`; the counted tokens are those of the shifted
      labels (``labels[..., 1:] != ignore_index``) of all micro-batches of the optimizer step, summed
      over processes when ``average_tokens_across_devices`` (the default), so the loss is one
      global mean under accumulation and DDP;
    * the teacher columns and ``shift_labels`` survive ``remove_unused_columns``;
    * without a ``data_collator`` it pads with :class:`DistillationCollator`;
    * the KD and CE terms are logged as ``kd_loss`` / ``ce_loss`` next to ``loss``.

    Example:
        >>> trainer = KDTrainer(model=student, args=TrainingArguments("out", gradient_accumulation_steps=2),
        ...                     train_dataset=dataset, teacher_model=teacher,
        ...                     distillation=DistillationConfig(temperature=2.0, fused=True))
        >>> trainer.train()
    """

    # the loss is divided by the step's global token count: Trainer must not divide it again
    loss_is_scaled_for_ga = True

    def __init__(self, *args, teacher_model: nn.Module | None = None,
                 distillation: DistillationConfig | None = None, **kwargs) -> None:
        distillation = DistillationConfig() if distillation is None else distillation
        if not isinstance(distillation, DistillationConfig):
            raise TypeError(f"distillation must be a DistillationConfig, got {type(distillation).__name__}")
        self.distillation = distillation
        self.teacher_model = teacher_model
        if kwargs.get("data_collator") is None and len(args) < 3:  # Trainer(model, args, data_collator, ...)
            student = kwargs.get("model", args[0] if args else None)
            kwargs["data_collator"] = DistillationCollator(
                pad_token_id=_pad_token_id(kwargs.get("processing_class"), student),
                ignore_index=distillation.ignore_index, teacher_ids_column=distillation.teacher_ids_column,
                teacher_values_column=distillation.teacher_values_column)
        super().__init__(*args, **kwargs)
        # transformers < 5.x reads this flag instead of loss_is_scaled_for_ga
        self.model_accepts_loss_kwargs = True
        if teacher_model is not None:
            teacher_model.to(self.args.device).eval().requires_grad_(False)
        self._kd_sums: dict[str, torch.Tensor] = {}
        self._kd_last_logged_step = 0

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in ("shift_labels", *self.distillation.teacher_columns):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        counts = [shifted_labels(batch, self.distillation.ignore_index).ne(self.distillation.ignore_index).sum()
                  for batch in batch_samples if "labels" in batch or "shift_labels" in batch]
        if not counts:
            return None
        total = torch.stack(counts).sum().to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        loss, output = distillation_loss(model, inputs, num_items_in_batch, teacher_model=self.teacher_model,
                                         config=self.distillation, trainer=self, return_outputs=True)
        if model.training:
            self._record("kd_loss", output.kd_loss)
            if output.ce_loss is not None:
                self._record("ce_loss", output.ce_loss)
        return (loss, output.student_outputs) if return_outputs else loss

    def _record(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._kd_sums[name] = self._kd_sums[name] + value if name in self._kd_sums else value

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._kd_sums:
            steps = max(1, self.state.global_step - self._kd_last_logged_step)
            for name, total in sorted(self._kd_sums.items()):
                value = (total / steps).reshape(1)
                if self.args.world_size > 1:
                    value = self.accelerator.gather(value)
                logs[name] = value.mean().item()
            self._kd_sums = {}
            self._kd_last_logged_step = self.state.global_step
        super().log(logs, *args, **kwargs)


def _pad_token_id(processing_class, model) -> int:
    for source in (processing_class, getattr(unwrap_model(model), "config", None) if model is not None else None):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return 0
