"""Batch-wise Sinkhorn distillation, SinKD: :func:`sinkhorn_loss` and :class:`SinkhornLoss`.

The B student and B' teacher probability vectors (softmax at temperature T) are two point clouds in the
class simplex; an entropic optimal-transport plan between them (``n_iters`` Sinkhorn iterations, row step
then column step, on the L1 cost, stabilised against underflow) weights the costs:
``L = scale · Σ_ij P_ij · ||s_i − t_j||_1``. The gradient flows through the cost and through the plan (the
exact adjoint of the iterations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops
from ._autocast import cast_loss
from ._collectives import gather_rows, group_rank_world
from ._dispatch import use_kernel
from ._options import OptionsModule
from ._validation import (
    accumulation_dtype,
    check_bool,
    check_int,
    check_real,
    check_same_device,
    check_scale,
    check_tensor,
)

__all__ = ["SinkhornLoss", "SinkhornOptions", "sinkhorn_loss"]

#: Smallest ε: the log-domain iterate starts at −W/ε ≥ −2/ε (W ≤ 2), which must stay finite in fp32 with
#: room for the log-sum-exps added to it; below ~6e-39 it is −inf and the row normalisation −inf − (−inf).
EPSILON_MIN = 1e-30
#: Most iterations: the backward keeps 2·n_iters·(B + B') increments; 10⁴ is far past convergence.
N_ITERS_MAX = 10_000


@dataclass(frozen=True)
class SinkhornOptions:
    """Options of :func:`sinkhorn_loss`.

    Args:
        temperature: softmax temperature T > 0 for both sides (default 2.0, the official value).
        epsilon: entropic regularisation ε > 0 (default 0.1); any ε > 0 is finite in every dtype.
        n_iters: Sinkhorn iterations ≥ 1, each a row then a column normalisation (default 20).
        scale: output multiplier (default 1.0; the official code uses 1e-3 on GLUE, 8e-4 on T0).
        gather_across_ranks: couple the global batch under an initialised ``torch.distributed`` process
            group (default False).
    """

    temperature: float = 2.0
    epsilon: float = 0.1
    n_iters: int = 20
    scale: float = 1.0
    gather_across_ranks: bool = False

    def __post_init__(self) -> None:
        check_scale(self.temperature, "temperature")
        check_real(self.epsilon, "epsilon", low=EPSILON_MIN, low_open=False)
        check_int(self.n_iters, "n_iters", low=1, high=N_ITERS_MAX)
        check_real(self.scale, "scale")
        check_bool(self.gather_across_ranks, "gather_across_ranks")


def sinkhorn_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = SinkhornOptions.temperature,
    epsilon: float = SinkhornOptions.epsilon,
    n_iters: int = SinkhornOptions.n_iters,
    scale: float = SinkhornOptions.scale,
    gather_across_ranks: bool = SinkhornOptions.gather_across_ranks,
    group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """SinKD: the Sinkhorn-weighted L1 distance between the batch's student and teacher distributions.

    ``s_i = softmax(student_logits[i]/T)``, ``t_j = softmax(teacher_logits[j]/T)``,
    ``W_ij = ||s_i − t_j||_1``; ``P`` is ``exp(−W/ε)`` after ``n_iters`` rounds of "normalise rows
    to sum 1, then columns to sum 1" (the official code's recursion, with its scalings absorbed into
    log-domain potentials before they under- or overflow, and in the log domain at small ε);
    the loss is ``scale · Σ_ij P_ij W_ij`` (one scalar per batch, no mean).

    Args:
        student_logits: ``[B, C]`` student logits (rows = samples, columns = classes).
        teacher_logits: ``[B', C]`` teacher logits, a constant (detached); ``B'`` may differ from
            ``B``; any float dtype.
        temperature, epsilon, n_iters, scale: see :class:`SinkhornOptions`.
        gather_across_ranks: under an initialised ``torch.distributed`` process group, couple the
            global batch: every rank computes the loss over all ranks' rows (concatenated in rank
            order) and receives the gradient of that loss w.r.t. its own rows. Without a process
            group this is the local loss.
        group: the process group (or 1-D ``DeviceMesh``) whose ranks are coupled by
            ``gather_across_ranks`` (default None: the default group), e.g. the data-parallel group of a
            DP × TP mesh.
        backend: ``"auto"`` (compiled kernel if available, else the reference with one warning),
            ``"kernel"`` or ``"reference"``.

    Shape:
        ``student_logits [B, C]``, ``teacher_logits [B', C]`` → a scalar.

    Returns:
        A scalar in ``student_logits.dtype`` (fp32 under autocast); 0 (with a zero gradient) if ``B = 0`` or ``B' = 0``.
        Accumulation is fp32 (fp64 for fp64 students).

    Example:
        >>> student = torch.randn(16, 10, requires_grad=True)
        >>> sinkhorn_loss(student, torch.randn(16, 10)).backward()

    References:
        Cui et al., "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation" (2024), and its
        official code.
    """
    options = SinkhornOptions(temperature=temperature, epsilon=epsilon, n_iters=n_iters, scale=scale,
                              gather_across_ranks=gather_across_ranks)
    check_tensor(student_logits, "student_logits", ndim=2)
    check_tensor(teacher_logits, "teacher_logits", ndim=2)
    device = check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    classes = student_logits.shape[1]
    if classes == 0:
        raise ValueError(f"student_logits must have at least one class, got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape[1] != classes:
        raise ValueError(
            f"teacher_logits must be [B', C] with C = {classes} (from student_logits), "
            f"got shape {tuple(teacher_logits.shape)}"
        )
    teacher_logits = teacher_logits.detach()
    if gather_across_ranks and group_rank_world(group)[1] > 1:
        student_logits = gather_rows(student_logits, group)
        teacher_logits = gather_rows(teacher_logits, group)
    if not use_kernel("sinkhorn", device, backend):
        from .reference.sinkhorn import sinkhorn_reference

        return sinkhorn_reference(student_logits, teacher_logits, options=options)
    teacher_acc = teacher_logits.to(accumulation_dtype(student_logits.dtype))
    temperature_t, epsilon_t, scale_t = _float_args(temperature, epsilon, scale)
    loss = torch.ops.kdloss.sinkhorn_fwd(student_logits, teacher_acc, temperature_t, epsilon_t, int(n_iters),
                                         scale_t)[0]
    return cast_loss(loss, student_logits.dtype)


_FLOAT_ARGS: dict = {}


def _float_args(temperature, epsilon, scale):
    """The op's temperature, epsilon and scale tensors (see :func:`kdloss._ops.float_arg`). Outside
    ``torch.compile`` and inference mode (whose tensors cannot be saved for a later backward) they
    are cached per value (the op only reads them): at GLUE sizes creating them is a sizeable part of
    a call."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return _ops.float_arg(temperature), _ops.float_arg(epsilon), _ops.float_arg(scale)
    key = (float(temperature), float(epsilon), float(scale))
    cached = _FLOAT_ARGS.get(key)
    if cached is None:
        if len(_FLOAT_ARGS) >= 64:
            _FLOAT_ARGS.clear()
        cached = _FLOAT_ARGS[key] = tuple(_ops.float_arg(v) for v in key)
    return cached


class SinkhornLoss(OptionsModule):
    """Module form of :func:`sinkhorn_loss`.

    Args:
        temperature, epsilon, n_iters, scale, gather_across_ranks, backend: as in :func:`sinkhorn_loss`.
        group: as in :func:`sinkhorn_loss`; a plain attribute (runtime state, not an option).

    Shape:
        ``forward(student_logits [B, C], teacher_logits [B', C])`` → a scalar.

    Example:
        >>> loss_fn = SinkhornLoss(temperature=2.0)
        >>> loss_fn(torch.randn(16, 10, requires_grad=True), torch.randn(16, 10)).backward()
    """

    def __init__(
        self,
        *,
        temperature: float = SinkhornOptions.temperature,
        epsilon: float = SinkhornOptions.epsilon,
        n_iters: int = SinkhornOptions.n_iters,
        scale: float = SinkhornOptions.scale,
        gather_across_ranks: bool = SinkhornOptions.gather_across_ranks,
        group=None,
        backend: str = "auto",
    ) -> None:
        options = SinkhornOptions(temperature=temperature, epsilon=epsilon, n_iters=n_iters, scale=scale,
                                  gather_across_ranks=gather_across_ranks)
        super().__init__(options, backend)
        self.group = group

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """See :func:`sinkhorn_loss`."""
        return sinkhorn_loss(student_logits, teacher_logits, group=self.group, backend=self.backend,
                             **self.option_kwargs())
