"""Readable pure-PyTorch references of every kdloss loss with a kernel (the ground truth of the kernel
tests, the fuzzer and the ``backend="reference"`` fallback).

They compute in the accumulation dtype (fp32, or fp64 for fp64 inputs) and return the student's dtype
(the accumulation dtype inside ``torch.autocast``, like the kernels); gradients come from autograd.
One module per loss with a reference (``kdloss/reference/<loss>.py``); each module's ``__all__`` is
exported here.
"""

import importlib

from .._registry import LOSSES

__all__ = []
for _loss in LOSSES:
    try:
        _module = importlib.import_module(f"{__name__}.{_loss.name}")
    except ModuleNotFoundError as _error:
        if _error.name != f"{__name__}.{_loss.name}":
            raise
        continue
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
__all__.sort()
