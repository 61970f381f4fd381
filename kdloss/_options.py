"""Loss options as one frozen dataclass per loss, shared by the functional, the module and the reference.

A loss declares ``@dataclass(frozen=True) class <Name>Options`` whose ``__post_init__`` validates every
field (so defaults and checks are written once). The functional builds it from its keywords, the
reference receives it, and the module keeps one in ``self.options``.

:class:`OptionsModule` is the module base: each option field reads and writes through ``self.options``
(``loss_fn.temperature = 4.0`` replaces the options with a validated copy, so the next call uses it,
also under ``torch.compile``, which guards on the options object).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ._validation import BACKENDS, check_option

__all__ = ["OptionsModule", "option_names"]


def option_names(options_class: type) -> tuple[str, ...]:
    """Field names of an options dataclass, in declaration order."""
    return tuple(field.name for field in dataclasses.fields(options_class))


class OptionsModule(nn.Module):
    """Base of every loss module: options live in one frozen dataclass, ``self.options``.

    Attribute access to an option field (``module.temperature``) reads ``self.options``; assignment
    validates and replaces it. ``backend`` is a plain validated attribute.

    Args:
        options: an instance of the loss's options dataclass.
        backend: ``"auto"``, ``"kernel"`` or ``"reference"``.
    """

    def __init__(self, options, backend: str) -> None:
        super().__init__()
        self._option_names = option_names(type(options))
        self.options = options
        self.backend = backend

    def __getattr__(self, name: str):
        names = self.__dict__.get("_option_names", ())
        if name in names:
            return getattr(self.__dict__["options"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name == "backend":
            value = check_option(value, "backend", BACKENDS)
        elif name in self.__dict__.get("_option_names", ()):
            name, value = "options", dataclasses.replace(self.__dict__["options"], **{name: value})
        super().__setattr__(name, value)

    def option_kwargs(self) -> dict:
        """The options as keyword arguments of the functional (without ``backend``)."""
        return {name: getattr(self.options, name) for name in self._option_names}

    def extra_repr(self) -> str:
        items = {**self.option_kwargs(), "backend": self.backend}
        return ", ".join(f"{key}={value!r}" for key, value in items.items())
