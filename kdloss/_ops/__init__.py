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

for _loss in LOSSES:
    if _loss.ops:
        importlib.import_module(f"{__name__}.{_loss.name}")
