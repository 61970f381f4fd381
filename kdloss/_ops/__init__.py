"""Schemas, fake (meta) implementations and autograd formulas of every ``kdloss::`` op.

Schemas are defined once, here in Python; the C++ files under ``csrc/`` only provide
``TORCH_LIBRARY_IMPL(kdloss, CPU|CUDA, m)`` kernels for them. One submodule per loss.
"""

import torch

#: The ``kdloss`` operator namespace. Kept alive for the lifetime of the process.
LIB = torch.library.Library("kdloss", "DEF")

REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}

from . import margin_mse  # noqa: E402,F401  (registers the margin_mse ops)
from . import topk_kl  # noqa: E402,F401  (registers the topk_kl ops)
from . import fused_linear_topk_kl  # noqa: E402,F401  (registers the fused_linear_topk_kl ops)
from . import sinkhorn  # noqa: E402,F401  (registers the sinkhorn ops)
from . import plackett_luce  # noqa: E402,F401  (registers the plackett_luce ops)
from . import token_contextual  # noqa: E402,F401  (registers the token_contextual ops)
from . import token_graph  # noqa: E402,F401  (registers the token_graph ops)
