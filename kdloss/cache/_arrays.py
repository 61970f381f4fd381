"""Converting user inputs (tensors, arrays, lists) to numpy with a dtype check."""

from __future__ import annotations

import numpy as np
import torch


def as_array(value, name: str, kind: str) -> np.ndarray:
    """``value`` as a numpy array whose dtype is integer (``kind="int"``) or floating (``"float"``).

    Tensors are detached and moved to the CPU (bf16 becomes fp32, exactly); lists go through
    ``np.asarray``. A bool or wrong-kind dtype raises ``TypeError`` naming ``name``.
    """
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        if tensor.dtype == torch.uint16:
            tensor = tensor.to(torch.int32)
        array = tensor.numpy()
    elif isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, (list, tuple)):
        array = np.asarray(value)
        if array.size == 0:
            array = array.astype(np.int64 if kind == "int" else np.float32)
    else:
        raise TypeError(f"{name} must be a torch.Tensor, a numpy array or a list, got {type(value).__name__}")
    ok = array.dtype.kind in "iu" if kind == "int" else array.dtype.kind == "f"
    if not ok:
        wanted = "an integer" if kind == "int" else "a floating-point"
        raise TypeError(f"{name} must have {wanted} dtype, got {array.dtype}")
    return array
