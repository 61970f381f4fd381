"""Functional forms of every kdloss loss (each also takes ``backend="auto"|"kernel"|"reference"``).

The functions are those the registry (:mod:`kdloss._registry`) lists for each loss, defined in
``kdloss/<loss>.py``.
"""

import importlib

from ._registry import LOSSES

__all__ = []
for _loss in LOSSES:
    _module = importlib.import_module(f"kdloss.{_loss.name}")
    for _name in _loss.functionals:
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
__all__.sort()
