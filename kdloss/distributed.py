"""Data-parallel training helpers: the ``num_items_in_batch`` that makes DDP exact, and losses
with trainable parameters under DDP.

**Counted means under data parallelism.** A loss with a counted mean (top-k KL, the fused head,
PLD) divides the sum of its per-position terms ``S`` by a count. With ``W`` data-parallel ranks
(DistributedDataParallel, FSDP, DeepSpeed: anything that *averages* gradients over ranks), rank
``r`` holding ``N_r`` counted positions and passing ``num_items_in_batch = d``, the optimizer sees

.. code-block:: text

    g = (1/W) · Σ_r ∇S_r / d

while the gradient of the global mean over all ``N = Σ_r N_r`` positions is ``Σ_r ∇S_r / N``.
They agree exactly when ``d = N / W``: the global count divided by the number of ranks. The
default (``d = N_r``, each rank's own count) weights a position on a rank with few counted
tokens more than one on a busy rank; passing the global count ``N`` makes the gradient ``W``
times too small. :func:`num_items_for_ddp` returns ``N / W``.

**Gradient accumulation.** With ``M`` micro-batches per optimizer step, the gradients of the
micro-batch losses add up, and every micro-batch must divide by the same ``d = N / W`` where
``N`` now counts the positions of all micro-batches of the step on all ranks. Pass the labels of
every micro-batch of the step at once: ``num_items_for_ddp([labels_1, …, labels_M])``.

**Hugging Face.** ``Trainer`` (transformers 5) computes ``num_items_in_batch`` as the count of
labels ≠ -100 over the micro-batches of the step (over ``labels[..., 1:]`` for causal LMs), summed
over ranks when ``average_tokens_across_devices`` is on (the default): that is ``N``. Its *own*
``compute_loss`` then multiplies the loss by the number of processes (when the model accepts loss
kwargs), which undoes DDP's averaging — the same as dividing by ``N / W``. A ``compute_loss``
override that passes Trainer's ``num_items_in_batch`` to a kdloss loss loses that factor: pass
``num_items_in_batch / self.accelerator.num_processes`` instead (what this function computes from
the labels), or multiply the loss by the number of processes.

**Parameters used outside the DDP forward.** DDP synchronises a parameter's gradient only if the
backward it takes part in follows a forward through the DDP wrapper *in the same iteration*.

* Fused LM head: take the hidden states from the wrapped model (``ddp_model(...,
  output_hidden_states=True)``, or a wrapped module that returns them) and the head weight from
  the wrapped module's own parameters (``ddp_model.module.lm_head.weight``): the weight is used
  outside the forward, but because the forward ran through DDP its gradient is reduced with the
  others. Calling an unwrapped submodule for the hidden states (``ddp_model.module.model(...)``)
  skips DDP altogether: no gradient is synchronised and ranks drift apart without an error.
* Losses with parameters (``TRGLoss``'s projection heads): :func:`register_loss` makes the loss a
  submodule of the model *before* it is wrapped and before the optimizer is built, so its
  parameters are broadcast from rank 0 at wrapping, synchronised every step and optimised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._validation import check_index_tensor, check_int, comparable

__all__ = ["num_items_for_ddp", "register_loss", "world_size"]


def world_size(group=None) -> int:
    """Number of ranks in ``group`` (the default group when None); 1 when ``torch.distributed`` is
    unavailable or not initialised.

    Example:
        >>> world_size()
        1
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _label_tensors(labels) -> list[torch.Tensor]:
    if isinstance(labels, torch.Tensor):
        return [labels]
    if isinstance(labels, Sequence) and not isinstance(labels, (str, bytes)):
        tensors = list(labels)
        if not tensors:
            raise ValueError("labels must hold at least one tensor (the micro-batches of one step), got an empty "
                             f"{type(labels).__name__}")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"labels[{i}] must be a torch.Tensor, got {type(t).__name__}")
        return tensors
    raise TypeError(f"labels must be a torch.Tensor or a list/tuple of tensors, got {type(labels).__name__}")


def _check_integer_labels(tensors: list[torch.Tensor]) -> torch.device:
    device = tensors[0].device
    for i, t in enumerate(tensors):
        name = "labels" if len(tensors) == 1 else f"labels[{i}]"
        check_index_tensor(t, name)
        if t.device != device:
            raise ValueError(f"{name} must be on {device} (the device of the first labels), got {t.device}")
    return device


def num_items_for_ddp(labels, ignore_index: int = -100, group=None) -> torch.Tensor:
    """The ``num_items_in_batch`` that makes gradient-averaging data parallelism exact.

    Counts the positions whose label is not ``ignore_index`` (over all given micro-batches), sums
    the count over the ranks of ``group`` (one ``all_reduce``; every rank must call this) and
    divides by the group size:

    .. code-block:: text

        d = (Σ_ranks Σ_micro-batches #{labels ≠ ignore_index}) / world_size

    With every rank dividing its summed loss by ``d``, DDP's gradient averaging
    ``(1/W)·Σ_r ∇S_r / d`` is exactly ``Σ_r ∇S_r / N``, the gradient of the mean over the ``N``
    counted positions of the global batch (see the module docstring). The returned loss value on
    each rank is ``S_r / d``; their average over ranks is the global mean.

    Args:
        labels: the labels exactly as the loss receives them (already shifted for causal LMs), an
            integer tensor (int64/int32/int16/uint16/int8/uint8) of any shape — or a list/tuple of
            them, the micro-batches of one optimizer step under gradient accumulation (pass the
            same result to every micro-batch's loss).
        ignore_index: label value of positions that do not count (default -100).
        group: the process group gradients are averaged over (default: the default group). Its
            backend must support the labels' device (NCCL: CUDA tensors; gloo: CPU tensors).

    Returns:
        A 0-d float64 tensor (float32 on MPS, which has no float64) on the labels' device; the
        loss converts it to its accumulation dtype. The count itself is summed exactly in int64.
        No host synchronisation: the count and the collective stay on the device. Without an
        initialised ``torch.distributed`` (or with one rank) it is the local count.

    Example:
        >>> labels = torch.tensor([[5, 7, -100], [3, -100, -100]])
        >>> num_items_for_ddp(labels)  # single process: the local count
        tensor(3., dtype=torch.float64)
        >>> # under DDP, per optimizer step with micro-batches mb_1..mb_M:
        >>> # d = num_items_for_ddp([mb["labels"] for mb in micro_batches])
        >>> # for mb in micro_batches: topk_kl_loss(..., labels=mb["labels"], num_items_in_batch=d).backward()
    """
    tensors = _label_tensors(labels)
    device = _check_integer_labels(tensors)
    ignore_index = check_int(ignore_index, "ignore_index")
    count = torch.zeros((), dtype=torch.int64, device=device)
    for t in tensors:
        count = count + (comparable(t) != ignore_index).sum(dtype=torch.int64)
    world = world_size(group)
    if world > 1:
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM, group=group)
    return count.to(torch.float32 if device.type == "mps" else torch.float64) / world


def register_loss(model: nn.Module, loss: nn.Module, name: str = "distillation_loss") -> nn.Module:
    """Registers a loss with trainable parameters (e.g. ``TRGLoss``'s projection heads) as a
    submodule of ``model``, so that DDP and the optimizer treat them like the model's own.

    Call it before wrapping the model (``DistributedDataParallel``, ``torch.compile``, a
    ``Trainer``) and before building the optimizer. Then:

    * ``model.parameters()`` (what the optimizer and ``Trainer`` use) includes the loss's
      parameters, and ``model.state_dict()`` saves them;
    * DDP broadcasts them from rank 0 when it wraps the model (all ranks start equal) and
      averages their gradients every step (all ranks stay equal), provided the step's backward
      follows a forward through the DDP wrapper — call the loss as ``ddp_model.module.<name>(…)``
      after ``ddp_model(…)``. If some of the loss's parameters receive no gradient in a step (a
      term weighted 0), wrap with ``find_unused_parameters=True``.

    Args:
        model: the (unwrapped) model being trained.
        loss: the loss module holding trainable parameters; moved by ``model.to(...)`` from now on.
        name: attribute name of the loss on ``model`` (default ``"distillation_loss"``); must be
            free.

    Returns:
        ``model`` (the same object), now holding ``loss`` as ``model.<name>``.

    Example:
        >>> from kdloss import TRGLoss
        >>> student = register_loss(nn.Linear(4, 4), TRGLoss(student_dim=4, teacher_dim=8, embed_dim=16))
        >>> sorted({name.split(".")[1] for name, _ in student.named_parameters() if "." in name})
        ['student_proj', 'teacher_proj']
        >>> # then, per process:
        >>> # ddp = torch.nn.parallel.DistributedDataParallel(student)
        >>> # optimizer = torch.optim.AdamW(ddp.parameters())
        >>> # loss = ddp.module.distillation_loss(ddp(tokens), teacher_tokens)
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(loss, nn.Module):
        raise TypeError(f"loss must be a torch.nn.Module, got {type(loss).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a valid attribute name, got {name!r}")
    if isinstance(model, DistributedDataParallel) or hasattr(model, "_orig_mod"):
        raise ValueError(
            "model must be the unwrapped module: register the loss before wrapping it with "
            "DistributedDataParallel or torch.compile (a wrapper has already broadcast and bucketed the parameters)"
        )
    if hasattr(model, name):
        raise ValueError(f"name {name!r} is already an attribute of {type(model).__name__}; pick another name")
    model.add_module(name, loss)
    return model
