"""kdloss: knowledge-distillation losses with hand-written CPU and CUDA kernels.

Every loss is an ``nn.Module`` here and a function in :mod:`kdloss.functional` (also exported here);
the pure-PyTorch references live in :mod:`kdloss.reference`. The losses are those of the registry
(:mod:`kdloss._registry`). Kernels compile on first use (``python -m kdloss.build`` prebuilds them).
"""

import importlib

from . import distributed, functional, sparse
from ._build import KernelUnavailableError
from ._memory import empty_cache
from ._registry import LOSSES

__version__ = "0.2.0"

__all__ = ["KernelUnavailableError", "__version__", "distributed", "empty_cache", "functional", "reference", "sparse"]
for _loss in LOSSES:
    _module = importlib.import_module(f"{__name__}.{_loss.name}")
    for _name in (*_loss.modules, *_loss.functionals):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
__all__.sort()


def __getattr__(name: str):
    # the references are for tests, the fuzzer and the fallback: imported on first use only
    if name == "reference":
        return importlib.import_module(f"{__name__}.reference")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
