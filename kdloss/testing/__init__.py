"""Shared input generators and parity checks for every loss: the fuzzer (``python -m kdloss.fuzz``),
the property tests and the benchmarks all draw inputs from here.

Each loss registers a :class:`LossSpec` (see ``kdloss/testing/<loss>.py``): a hypothesis strategy
producing a *case* — a dict of plain values (shapes, options, layout, seed) that fully determines the
inputs, so a failing case can be printed and pasted — plus functions that build the tensors and run
the kernel, the reference and the naive low-precision eager formula.

Error rule (docs/verifying.md): for a low-precision dtype the kernel's error against the fp64
reference, for the value and every gradient, may not exceed the naive eager error in that dtype plus
``SLACK · eps(dtype) · (1 + max|exact|)``; for fp64 it may not exceed ``FP64_RTOL · (1 + max|exact|)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from .. import _registry

# In fp32 the kernel and eager code round alike, and the cancellation in differences such as
# (s⁺ − s⁻) − (t⁺ − t⁻) amplifies either's rounding relative to the result: on 400 random Margin-MSE
# cases the kernel needed up to 10·eps·(1 + scale) over eager's own error (bf16/fp16: < 0.4·eps).
SLACK = 16.0
FP64_RTOL = 1e-10


@dataclass
class Built:
    """Tensors of one case: ``inputs`` are the differentiable leaves, ``constants`` the rest."""

    inputs: tuple[torch.Tensor, ...]
    constants: dict
    upstream_seed: int


@dataclass
class Example:
    """One small, valid call of a loss's functional form, for the registry-wide contract tests.

    ``args`` are the functional's positional tensors (``args[i]`` for ``i`` in ``differentiable``
    require grad), ``options`` keyword options with non-default values.
    """

    args: tuple
    options: dict
    differentiable: tuple[int, ...] = (0,)


@dataclass
class LossSpec:
    """How the fuzzer, property tests and benchmarks exercise one loss.

    ``build(case, device, dtype) -> Built``; ``kernel``, ``reference`` and ``naive`` take
    ``(case, *inputs, **constants)`` and return the loss (``reference`` receives fp64 CPU copies).
    ``example(device, dtype) -> Example`` is one small valid call of the functional form.
    ``value_scale(case, *inputs, **constants) -> float`` (optional; fp64 CPU inputs) is the magnitude of
    the terms the loss value sums, where it can far exceed the value itself (a KL of two nearly equal
    distributions, scaled by T²): the scale of the value's slack instead of ``max|exact|``
    (docs/verifying.md, "The error rule"). ``naive_variants`` (optional) are other eager formulations
    as legitimate as ``naive`` whose rounding differs (a GEMM in another order or chunking): an output's
    low-precision bound is the largest over ``naive`` and them, since where the loss is ill-conditioned
    the rounding order alone moves the result by more than the slack. ``rounded_exact(case,
    *inputs, dtype=, **constants)`` (optional; fp64 CPU inputs) is the exact result after the roundings the op's
    contract itself makes in ``dtype`` (the fused head's logits, rounded to the weight's dtype as
    ``nn.Linear`` rounds them): where it overflows ``dtype``, an infinity of its sign is the right answer.
    ``oracle(case, *inputs, upstream_seed=, **constants)`` (optional; fp64 CPU inputs) returns
    ``[value, *grads]`` in extended precision (or None where the platform has none), for losses whose
    float64 reference is itself inaccurate in part of the domain (SinKD at ε = 1e-8: every log-plan
    entry is a difference of numbers of size W/ε). The oracle is then the exact result, and a float64
    kernel must err by at most twice the float64 reference's own error (the two share most of it: any
    float64 evaluation rounds the same W/ε terms), or :data:`FP64_RTOL` where that is larger.
    """

    name: str
    strategy: Callable[[], object]
    build: Callable[[dict, torch.device, torch.dtype], Built]
    kernel: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    naive: Callable[..., torch.Tensor]
    example: Callable[[torch.device, torch.dtype], Example]
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    value_scale: Callable[..., float] | None = None
    naive_variants: tuple[Callable[..., torch.Tensor], ...] = ()
    rounded_exact: Callable[..., torch.Tensor] | None = None
    oracle: Callable[..., list[torch.Tensor] | None] | None = None


REGISTRY: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> LossSpec:
    REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> LossSpec:
    _load_specs()
    if name not in REGISTRY:
        raise ValueError(f"loss must be one of {sorted(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def names() -> list[str]:
    _load_specs()
    return sorted(REGISTRY)


def _load_specs() -> None:
    """Imports ``kdloss.testing.<name>`` of every loss whose registry entry has a fuzz spec."""
    for loss in _registry.LOSSES:
        if loss.fuzz:
            importlib.import_module(f"{__name__}.{loss.name}")


@dataclass
class CheckResult:
    """Worst error/bound over the value and the gradients of one case."""

    ok: bool
    error: float
    bound: float
    what: str
    details: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.error / self.bound if self.bound > 0 else (0.0 if self.error == 0 else float("inf"))

    def __str__(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        return f"{verdict}: worst {self.what} error {self.error:.3e} vs bound {self.bound:.3e}"


def upstream_weights(shape, upstream_seed: int) -> torch.Tensor:
    """The fp64 upstream gradient the checks pull through a loss output of ``shape``."""
    gen = torch.Generator().manual_seed(upstream_seed)
    return torch.rand(shape, generator=gen, dtype=torch.float64)


def _outputs_and_grads(fn, case, inputs, constants, upstream_seed):
    out = fn(case, *inputs, **constants)
    weight = upstream_weights(out.shape, upstream_seed).to(out.device, out.dtype)
    need = [x for x in inputs if x.requires_grad]
    if need and out.requires_grad:
        grads = torch.autograd.grad(out, need, grad_outputs=weight, allow_unused=True)
    else:  # an output not connected to the inputs (e.g. no rows): zero gradients
        grads = (None,) * len(need)
    grads = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(need, grads, strict=False))
    return [out.detach(), *grads]


def _fp64_copies(tensors, device="cpu"):
    return tuple(t.detach().to(device, torch.float64).requires_grad_(t.requires_grad) for t in tensors)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference (inf if any element is NaN; 0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    diff = (a.detach().double().cpu() - b.detach().double().cpu()).abs()
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


def finite_magnitude(exact: torch.Tensor) -> float:
    """max|exact| over its finite entries (0 when there are none)."""
    e = exact.detach().double().cpu()
    e = e[torch.isfinite(e)]
    return e.abs().max().item() if e.numel() else 0.0


def error_where_exact_is_finite(kernel: torch.Tensor, exact: torch.Tensor) -> float:
    """:func:`max_abs`, except that an entry where the exact result itself is NaN or ±inf (an input at
    the loss's domain edge: a stored log-probability above 0 raised to the power 1/T = 1e6) counts as
    exact when the kernel gives the same (NaN for NaN, inf of the same sign)."""
    k, e = kernel.detach().double().cpu(), exact.detach().double().cpu()
    if k.shape != e.shape:
        return max_abs(k, e)
    same = (torch.isnan(e) & torch.isnan(k)) | (torch.isinf(e) & (k == e))
    return max_abs(k[~same], e[~same])


def nonfinite_where_exact_is_finite(kernel: torch.Tensor, exact: torch.Tensor, margin: float = 0.0,
                                    rounded: torch.Tensor | None = None) -> bool:
    """True if the kernel gives NaN or ±inf where the exact result, rounded to the kernel's dtype, is
    finite: always a failure, even where the naive formula breaks down too (its error, and with it
    the bound, is then infinite). Two exceptions, for ±inf only: of the exact result's sign where the
    exact value lies within ``margin`` (the rule's slack, finite even when the bound is not) of the
    overflow threshold — any evaluation in that dtype may round such a value to inf; and of the sign
    of ``rounded`` (the exact result after the roundings the op's contract makes, see
    :class:`LossSpec`) where that overflows the dtype."""
    if kernel.numel() == 0 or kernel.shape != exact.shape:
        return False
    k, e = kernel.detach().cpu(), exact.detach().cpu().double()
    finite = torch.isfinite(e.to(k.dtype))
    overflow_in_reach = ~torch.isfinite((e.abs() + margin).to(k.dtype)) & (torch.sign(k.double()) == torch.sign(e))
    if rounded is not None and rounded.shape == k.shape:
        r = rounded.detach().cpu().double()
        overflow_in_reach |= torch.isinf(r.to(k.dtype)) & (torch.sign(k.double()) == torch.sign(r))
    return bool(((torch.isnan(k) | (torch.isinf(k) & ~overflow_in_reach)) & finite).any())


def lowp_bound(naive: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> float:
    """Allowed error of a low-precision kernel: the naive eager error plus SLACK·eps·(1 + scale);
    ``scale`` defaults to max|exact|."""
    if scale is None:
        scale = finite_magnitude(exact)
    return error_where_exact_is_finite(naive, exact) + SLACK * torch.finfo(dtype).eps * (1.0 + scale)


def error_bound(naive: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> float:
    """The allowed absolute error of a kernel output in ``dtype`` (the error rule above): relative
    ``FP64_RTOL`` for float64, :func:`lowp_bound` of the naive eager output otherwise. ``scale``
    (default max|exact|) is the magnitude the slack is relative to."""
    if scale is None:
        scale = finite_magnitude(exact)
    if dtype == torch.float64:
        return FP64_RTOL * (1.0 + scale)
    return lowp_bound(naive, exact, dtype, scale)


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values as a leaf whose last dimension has stride 2 (0-d tensors are returned as is)."""
    if t.dim() == 0:
        return t
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2].detach().requires_grad_(t.requires_grad)


def check_case(loss: str, case: dict, device="cpu", dtype=torch.float32) -> CheckResult:
    """Runs one case of ``loss`` on ``device``/``dtype`` and compares with the fp64 reference."""
    spec = get(loss)
    device, dtype = torch.device(device), dtype
    built = spec.build(case, device, dtype)
    kernel = _outputs_and_grads(spec.kernel, case, built.inputs, built.constants, built.upstream_seed)
    exact_consts = {k: (v.to("cpu") if isinstance(v, torch.Tensor) else v) for k, v in built.constants.items()}
    exact = _outputs_and_grads(spec.reference, case, _fp64_copies(built.inputs), exact_consts, built.upstream_seed)
    naives = []
    truth = None
    if dtype == torch.float64 and spec.oracle is not None:
        truth = spec.oracle(case, *_fp64_copies(built.inputs), upstream_seed=built.upstream_seed, **exact_consts)
    if truth is not None:  # the fp64 reference is then what a float64 kernel is held to, like a naive
        naives, exact = [exact], truth
    if dtype != torch.float64:
        for formulation in (spec.naive, *spec.naive_variants):
            low = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in built.inputs)
            naives.append(_outputs_and_grads(formulation, case, low, built.constants, built.upstream_seed))
    rounded = [None] * len(exact)
    if dtype != torch.float64 and spec.rounded_exact is not None:
        rounded = _outputs_and_grads(partial(spec.rounded_exact, dtype=dtype), case, _fp64_copies(built.inputs),
                                     exact_consts, built.upstream_seed)
    labels = ["value"] + [f"grad[{i}]" for i in range(len(exact) - 1)]
    value_scale = None
    if spec.value_scale is not None:
        with torch.no_grad():
            terms = spec.value_scale(case, *_fp64_copies(built.inputs), **exact_consts)
        value_scale = max(terms, finite_magnitude(exact[0]))
    results = []
    for i, (k, e, r, label) in enumerate(zip(kernel, exact, rounded, labels, strict=False)):
        scale = value_scale if i == 0 else None
        if dtype == torch.float64:  # with an oracle: twice the fp64 reference's own error (they share most of it)
            bound = max([error_bound(e, e, dtype, scale)] + [2 * max_abs(naive[i], e) for naive in naives])
        else:
            bound = max(error_bound(naive[i], e, dtype, scale) for naive in naives)
        err = error_where_exact_is_finite(k, e)
        expected_dtype = torch.float64 if dtype == torch.float64 else dtype
        shape_ok = tuple(k.shape) == tuple(e.shape) and k.dtype == expected_dtype
        slack = error_bound(e, e, dtype, scale)  # the bound without the naive error: finite
        ok = shape_ok and err <= bound and not nonfinite_where_exact_is_finite(k, e, slack, r)
        results.append(CheckResult(ok, err, bound, label))
    failing = [r for r in results if not r.ok]
    worst = max(failing or results, key=lambda r: r.ratio)
    return CheckResult(not failing, worst.error, worst.bound, worst.what,
                       [f"{r.what}: error {r.error:.3e} bound {r.bound:.3e}{'' if r.ok else '  <-- FAIL'}"
                        for r in results])


def check_determinism(loss: str, case: dict, thread_counts=(1, 2, 3)) -> None:
    """CPU kernels: value and gradients bitwise identical across runs and thread counts."""
    spec = get(loss)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (*thread_counts, thread_counts[0]):
            torch.set_num_threads(threads)
            built = spec.build(case, torch.device("cpu"), torch.float32)
            results.append(_outputs_and_grads(spec.kernel, case, built.inputs, built.constants, built.upstream_seed))
    finally:
        torch.set_num_threads(before)
    for threads, other in zip((*thread_counts[1:], thread_counts[0]), results[1:], strict=False):
        for a, b in zip(results[0], other, strict=False):
            if not torch.equal(a, b):
                raise AssertionError(f"{loss}: results differ between 1 and {threads} threads for case {case}")


def reproducer(loss: str, case: dict, device: str, dtype: torch.dtype) -> str:
    """A ready-to-paste Python snippet that re-runs one case."""
    return (
        "import torch\n"
        "from kdloss.testing import check_case\n"
        f"result = check_case({loss!r}, {case!r}, device={device!r}, dtype={dtype})\n"
        "print(result); print(*result.details, sep='\\n')\n"
    )
