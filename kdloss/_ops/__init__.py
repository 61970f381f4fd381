"""Schemas, fake (meta) implementations and autograd formulas of every ``kdloss::`` op.

Schemas are defined once, here in Python; the C++ files under ``csrc/`` only provide
``TORCH_LIBRARY_IMPL(kdloss, CPU|CUDA, m)`` kernels for them. One submodule per loss with ops (the
registry's ``ops`` flag), imported below in registry order.

Op contract shared by every op: float tensors in the loss's input dtype unless stated, reductions as
the integer codes of :data:`REDUCTION_CODES` (ATen's ``at::Reduction`` values), counted-mean divisors as
0-d tensors in the accumulation dtype (so no host sync), and outputs that never alias inputs.
"""

import importlib

import torch

from .._registry import LOSSES

#: The ``kdloss`` operator namespace. Kept alive for the lifetime of the process.
LIB = torch.library.Library("kdloss", "DEF")

#: Reduction codes of every op; the values of ATen's ``at::Reduction`` enum (csrc/include/kdloss/codes.h).
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}


def traced(*tensors) -> bool:
    """Whether these are a tracer's tensors (torch.compile, export, opcheck's AOT test), not real ones."""
    from torch._subclasses.fake_tensor import FakeTensor

    return torch.compiler.is_compiling() or any(
        type(t) is not torch.Tensor or isinstance(t, FakeTensor) or torch._is_functional_tensor(t) for t in tensors)


def float_arg(value) -> torch.Tensor:
    """A float option of an op (temperature, ε, scale, σ, soft-cap…) as a 0-d float64 CPU tensor.

    The ops take their float options as tensors, never as schema ``float`` arguments: under
    ``torch.compile`` a Python float that changes between calls becomes a symbolic float, and one
    handed to a ``float`` argument is specialised to its current value during tracing while the
    traced graph (the compile cache key) stays the same for every value — so a later call with
    another value could reuse a graph that computes with the first one. As a tensor computed by a
    traced multiplication the value is a graph input instead: correct for every value, without a
    recompilation per value. The kernels read it on the host (a CPU scalar: no device sync).
    """
    return torch.ones((), dtype=torch.float64, device="cpu") * value


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on gradients whose own backward raises: the kernels have no second derivative."""

    @staticmethod
    def forward(op, _anchor, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def setup_context(ctx, inputs, output):  # the separate form that torch.func transforms require
        ctx.op = inputs[0]

    @staticmethod
    def backward(ctx, *_):
        raise NotImplementedError(
            f"kdloss: the {ctx.op} kernel has no second derivative, so it cannot be differentiated twice "
            "(torch.autograd.grad(..., create_graph=True) followed by a backward through that gradient, "
            "e.g. a gradient penalty). Use backend='reference' (pure PyTorch) for higher-order gradients."
        )


def first_order_only(op: str, *grads):
    """The gradients an op's backward returns, guarded against double backward.

    When the backward itself is being recorded (``create_graph=True``: grad mode is on inside the
    backward), the returned gradients get a grad_fn that raises ``NotImplementedError`` if anything
    back-propagates through them — never a silently wrong second derivative. Otherwise they are
    returned as they are. ``None`` entries pass through.
    """
    if not torch.is_grad_enabled():
        return grads
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return grads
    # a fresh leaf that requires grad makes the outputs part of the recorded graph even when the
    # gradients are constants to autograd (e.g. precomputed in the forward)
    anchor = torch.zeros((), requires_grad=True)
    guarded = _FirstOrderOnly.apply(op, anchor, *(grads[i] for i in present))
    out = list(grads)
    for i, g in zip(present, guarded, strict=True):
        out[i] = g
    return tuple(out)


for _loss in LOSSES:
    if _loss.ops:
        importlib.import_module(f"{__name__}.{_loss.name}")
