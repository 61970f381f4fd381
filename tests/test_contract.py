"""The contract every loss with a kernel keeps, checked generically over the registry.

For each loss (its registry entry plus the ``Example`` call of its fuzz spec): the module equals the
functional and its options are live attributes; the kernel equals the reference in fp64; every op it
runs passes ``torch.library.opcheck`` with ``requires_grad`` off and on; ``torch.compile(fullgraph=True)``
(static and dynamic shapes) equals eager; ``gradcheck`` in fp64; an unknown backend, a wrong type, a
sparse tensor, an integer tensor and a bad reduction are rejected with the right exception naming the
argument. Per-loss files keep the semantics (closed forms, upstream parity, edge cases).
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdloss
from kdloss import _registry, testing

from helpers import assert_close_fp64

LOSSES = [loss for loss in _registry.LOSSES if loss.fuzz]
IDS = [loss.name for loss in LOSSES]


def _functional(loss):
    return getattr(kdloss.functional, loss.functionals[0])


def _module_class(loss):
    return getattr(kdloss, loss.modules[0])


def _example(loss, device="cpu", dtype=torch.float64, grad=True):
    example = testing.get(loss.name).example(torch.device(device), dtype)
    args = list(example.args)
    for i in example.differentiable:
        args[i] = args[i].detach().clone().requires_grad_(grad)
    return example, args


def _grads(out, args, example):
    inputs = [args[i] for i in example.differentiable]
    return torch.autograd.grad(out.sum(), inputs)


def _call(loss, args, options, **extra):
    return _functional(loss)(*args, **options, **extra)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_module_equals_functional_and_options_are_live(loss):
    example, args = _example(loss)
    module = _module_class(loss)(**example.options)
    assert_close_fp64(module(*args), _call(loss, args, example.options))
    for name, value in example.options.items():
        assert getattr(module, name) == value
        assert f"{name}={value!r}" in repr(module)
    field, value = next(iter(example.options.items()))
    default = {f.name: f.default for f in dataclasses.fields(module.options)}[field]
    setattr(module, field, default)  # an assignment takes effect on the next call
    assert getattr(module, field) == default
    assert_close_fp64(module(*args), _call(loss, args, {**example.options, field: default}))
    with pytest.raises((TypeError, ValueError), match=field):
        setattr(module, field, "not an option value")
    with pytest.raises(ValueError, match="backend"):
        module.backend = "triton"


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_kernel_equals_reference_fp64(loss):
    example, args = _example(loss)
    kernel = _call(loss, args, example.options, backend="kernel")
    reference = _call(loss, args, example.options, backend="reference")
    assert_close_fp64(kernel, reference)
    for a, b in zip(_grads(kernel, args, example), _grads(reference, args, example), strict=True):
        assert_close_fp64(a, b)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_gradcheck_fp64(loss):
    example, args = _example(loss)

    def fn(*differentiable):
        call = list(args)
        for i, tensor in zip(example.differentiable, differentiable, strict=True):
            call[i] = tensor
        return _call(loss, call, example.options, backend="kernel")

    assert torch.autograd.gradcheck(fn, tuple(args[i] for i in example.differentiable))


class _RecordOps(TorchDispatchMode):
    """Records every ``kdloss::`` op call (op, args) seen at the dispatcher."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "kdloss":
            self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def _fresh(value, requires_grad: bool):
    if isinstance(value, torch.Tensor):
        copy = value.detach().clone()
        return copy.requires_grad_(requires_grad and copy.is_floating_point())
    return value


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_every_op_passes_opcheck(loss):
    example, args = _example(loss)
    with _RecordOps() as recorder:
        out = _call(loss, args, example.options, backend="kernel")
        _grads(out, args, example)
    seen = {}
    for op, op_args in recorder.calls:
        seen.setdefault(op, op_args)
    assert seen, f"{loss.name}: the kernel path ran no kdloss op"
    for op, op_args in seen.items():
        for requires_grad in (False, True):
            torch.library.opcheck(op, tuple(_fresh(a, requires_grad) for a in op_args))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_compile_fullgraph_equals_eager(loss, dynamic):
    torch._dynamo.reset()
    example, args = _example(loss, dtype=torch.float32)
    fn = _functional(loss)

    def step(*tensors):
        return fn(*tensors, **example.options, backend="kernel")

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    eager_out = step(*args)
    compiled_out = compiled(*args)
    torch.testing.assert_close(compiled_out, eager_out)
    for a, b in zip(_grads(compiled_out, args, example), _grads(eager_out, args, example), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_bad_input_families(loss):
    example, args = _example(loss, grad=False)
    names = list(inspect.signature(_functional(loss)).parameters)
    first = names[0]
    with pytest.raises(ValueError, match="backend"):
        _call(loss, args, example.options, backend="triton")
    with pytest.raises(TypeError, match=first):
        _call(loss, [args[0].tolist(), *args[1:]], example.options)
    with pytest.raises(TypeError, match=first):
        _call(loss, [args[0].long(), *args[1:]], example.options)
    with pytest.raises(TypeError, match=first):
        _call(loss, [args[0].to_sparse(), *args[1:]], example.options)
    if "reduction" in names:
        with pytest.raises(ValueError, match="reduction"):
            _call(loss, args, {**example.options, "reduction": "batchmean"})
        with pytest.raises(TypeError, match="reduction"):
            _call(loss, args, {**example.options, "reduction": 1})


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_auto_runs_the_kernel_where_it_exists(loss):
    example, args = _example(loss, grad=False)
    with _RecordOps() as recorder:
        _call(loss, args, example.options, backend="auto")
    assert recorder.calls, f"{loss.name}: backend='auto' did not run the kernel although it loads here"
    with _RecordOps() as recorder:
        _call(loss, args, example.options, backend="reference")
    assert not recorder.calls
