"""kdloss: knowledge-distillation losses with hand-written CPU and CUDA kernels.

Losses are ``nn.Module`` classes here and functions in :mod:`kdloss.functional`; the pure-PyTorch
references live in :mod:`kdloss.reference`. Kernels compile on first use (``python -m kdloss.build``
prebuilds them).
"""

from . import distributed, functional, reference, sparse
from ._build import KernelUnavailableError
from .margin_mse import MarginMSELoss
from .sinkhorn import SinkhornLoss
from .fused_linear_topk_kl import FusedLinearTopKKLLoss
from .topk_kl import TopKKLLoss
from .plackett_luce import PlackettLuceLoss

__version__ = "0.1.0"

__all__ = ["FusedLinearTopKKLLoss", "SinkhornLoss", "TopKKLLoss", "sparse", "MarginMSELoss", "KernelUnavailableError", "distributed", "functional", "reference", "__version__"]
__all__ += ["PlackettLuceLoss"]
from .trg import TokenContextualLoss, TokenContrastiveLoss, TokenGraphLoss, TRGLoss  # noqa: E402
__all__ += ["TokenContextualLoss", "TokenGraphLoss", "TokenContrastiveLoss", "TRGLoss"]
