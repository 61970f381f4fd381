"""SinKD cases for the fuzzer, property tests and benchmarks.

A case: ``batch`` B and ``batch_t`` B' (0 allowed: an empty plan, loss 0), ``classes`` C,
``temperature`` (including 1e-4: one-hot softmaxes, and 100), ``epsilon`` (down to 1e-3, where the
multiplicative recursion underflows, and to 1e-8, where the log-domain potentials grow like W/ε),
``n_iters``, ``scale``, ``layout`` ("contiguous" | "strided": student's last dim not unit-stride |
"slice": the student is a column slice of a wider tensor), ``magnitude`` of the logits and ``seed``.
"""

from __future__ import annotations

import torch

from ..functional import sinkhorn_loss
from ..reference.sinkhorn import sinkhorn_multiplicative, sinkhorn_reference
from . import Built, Example, LossSpec, non_contiguous, register, upstream_weights


def strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        return {
            "batch": draw(st.one_of(st.just(0), st.just(1), st.integers(1, 40))),
            "batch_t": draw(st.one_of(st.just(0), st.just(1), st.integers(1, 40))),
            "classes": draw(st.one_of(st.just(1), st.just(2), st.integers(1, 40))),
            "temperature": draw(st.one_of(st.sampled_from([0.5, 1.0, 2.0, 4.0]), st.sampled_from([1e-4, 100.0]))),
            "epsilon": draw(st.one_of(st.sampled_from([1e-3, 0.01, 0.1, 1.0]), st.sampled_from([1e-8, 1e-6, 1e-5]))),
            "n_iters": draw(st.one_of(st.just(20), st.integers(1, 25))),
            "scale": draw(st.sampled_from([1.0, 1e-3, -2.5])),
            "layout": draw(st.sampled_from(["contiguous", "strided", "slice"])),
            "magnitude": draw(st.sampled_from([0.1, 1.0, 6.0])),
            "seed": draw(st.integers(0, 2**31 - 1)),
        }

    return cases()


def build(case: dict, device: torch.device, dtype: torch.dtype) -> Built:
    """Student logits (the leaf) and teacher logits (a constant, in the student's dtype)."""
    gen = torch.Generator().manual_seed(case["seed"])
    mag, classes = case["magnitude"], case["classes"]
    student = mag * torch.randn(case["batch"], classes, generator=gen, dtype=torch.float64)
    teacher = mag * torch.randn(case["batch_t"], classes, generator=gen, dtype=torch.float64)
    student, teacher = student.to(device, dtype), teacher.to(device, dtype)
    if case["layout"] == "strided":
        student = non_contiguous(student)
    elif case["layout"] == "slice":
        student = torch.cat([student, student[:, :1]], dim=1)  # the case uses [:, :C]
    return Built((student.requires_grad_(),), {"teacher": teacher}, upstream_seed=case["seed"] + 1)


def _student(case, inputs):
    (student,) = inputs
    return student[:, : case["classes"]] if case["layout"] == "slice" else student


def _options(case):
    return {k: case[k] for k in ("temperature", "epsilon", "n_iters", "scale")}


def kernel(case, *inputs, teacher):
    return sinkhorn_loss(_student(case, inputs), teacher, **_options(case), backend="kernel")


def reference(case, *inputs, teacher):
    return sinkhorn_reference(_student(case, inputs), teacher, **_options(case))


def naive(case, *inputs, teacher):
    """The official multiplicative recursion in the input dtype; where it is not finite (exp(−W/ε)
    underflows at small ε and the rows divide 0/0), the eager log-domain formula (the reference,
    accumulating in fp32), so that small ε keeps a finite bound."""
    out = sinkhorn_multiplicative(_student(case, inputs), teacher, **_options(case))
    if torch.isfinite(out).all():
        return out
    return sinkhorn_reference(_student(case, inputs), teacher, **_options(case))


def example(device, dtype) -> Example:
    gen = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((6, 4), (5, 4)))
    return Example((student.to(device, dtype), teacher.to(device, dtype)), {"temperature": 1.5, "n_iters": 5})


def _extended():
    """numpy's ``longdouble`` where it is wider than float64 (x86: 64-bit mantissa), else None."""
    try:
        import numpy as np
    except ImportError:  # the oracle is optional
        return None
    return np if np.finfo(np.longdouble).eps < 2.0**-60 else None


def _lse(np, x, axis):
    top = x.max(axis=axis, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))


def _softmax(np, z, temperature):
    e = np.exp((z - z.max(axis=1, keepdims=True)) / temperature)
    return e / e.sum(axis=1, keepdims=True)


def oracle(case, *inputs, upstream_seed, teacher):
    """The loss and the student gradient in extended precision (numpy ``longdouble``): the log-domain
    recursion forward, and its adjoint written out backward (each normalisation ``x − lse(x)`` passes
    ``dx − softmax(x)·Σdx``; the cost ``−W/ε`` and the L1 cost's sign). At ε = 1e-8 the float64
    reference errs by ~2e-6 relative (its log-plan entries are differences of numbers of size W/ε ~ 1e8);
    this one by ~2048x less. None without a wide ``longdouble`` or for an empty plan."""
    np = _extended()
    student = _student(case, inputs).detach()
    if np is None or student.shape[0] == 0 or teacher.shape[0] == 0:
        return None
    wide = np.longdouble
    temperature, epsilon, scale = (wide(case[k]) for k in ("temperature", "epsilon", "scale"))
    s = _softmax(np, student.numpy().astype(wide), temperature)
    t = _softmax(np, teacher.detach().double().numpy().astype(wide), temperature)
    diff = s[:, None, :] - t[None, :, :]
    cost = np.abs(diff).sum(axis=-1)
    x, steps = -cost / epsilon, []
    for _ in range(case["n_iters"]):
        for axis in (1, 0):
            steps.append((axis, x))
            x = x - _lse(np, x, axis)
    plan = np.exp(x)
    value = scale * (plan * cost).sum()
    upstream = wide(upstream_weights((), upstream_seed).item())
    d_x, d_cost = upstream * scale * plan * cost, upstream * scale * plan
    for axis, before in reversed(steps):
        d_x = d_x - np.exp(before - _lse(np, before, axis)) * d_x.sum(axis=axis, keepdims=True)
    d_cost = d_cost - d_x / epsilon
    d_s = (d_cost[:, :, None] * np.sign(diff)).sum(axis=1)
    d_z = s * (d_s - (d_s * s).sum(axis=1, keepdims=True)) / temperature
    grad = torch.zeros(inputs[0].shape, dtype=torch.float64)
    grad[:, : case["classes"]] = torch.from_numpy(d_z.astype(np.float64))
    return [torch.tensor(float(value), dtype=torch.float64), grad]


SPEC = register(LossSpec("sinkhorn", strategy, build, kernel, reference, naive, example, oracle=oracle))
