"""Fixed cases and input layouts for checking a loss's kernel on one device against its CPU kernel:
the device tests (``tests/test_cuda.py``) and the sanitizer probe of ``python -m kdloss.selftest``
use them.

:data:`CASES` holds, per loss, a few named cases in the format of the loss's fuzz spec
(``kdloss/testing/<loss>.py``): a ``small`` one (cheap even on a CPU) and larger ones whose sizes make
a GPU kernel run many blocks, cross its tile and block boundaries and take its multi-pass paths.
:func:`relayout` gives a tensor the same values in another memory layout:

* ``"misaligned"`` — contiguous, but starting one element into its storage (an odd offset, so no
  vector load of more than one element is aligned);
* ``"padded_rows"`` — every row (last dimension) starts at an odd offset: a row stride of L + 3;
* ``"strided"`` — the last dimension has stride 2.

:func:`compare_devices` runs one case on a device and on the CPU and applies the error rule of
:func:`kdloss.testing.check_case` to both against the float64 reference, and to their difference.

Example::

    from kdloss.testing.device import CASES, compare_devices
    result = compare_devices("topk_kl", CASES["topk_kl"]["small"], "cuda", torch.bfloat16, "misaligned")
    assert result.ok, result.details
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Built, CheckResult, error_bound, get, max_abs, non_contiguous

__all__ = ["CASES", "LAYOUTS", "Run", "compare_devices", "relayout", "relayout_built", "run_case"]

LAYOUTS = ("contiguous", "misaligned", "padded_rows", "strided")

CASES: dict[str, dict[str, dict]] = {
    "margin_mse": {
        "small": {"kind": "scores", "batch": 37, "n_neg": 3, "dim": 1, "teacher": "scores", "reduction": "mean",
                  "layout": "contiguous", "magnitude": 1.0, "seed": 101},
        "scores": {"kind": "scores", "batch": 5000, "n_neg": 7, "dim": 1, "teacher": "margins", "reduction": "none",
                   "layout": "contiguous", "magnitude": 3.0, "seed": 102},
        "embeddings": {"kind": "embeddings", "batch": 300, "n_neg": 9, "dim": 768, "teacher": "scores",
                       "reduction": "sum", "layout": "contiguous", "magnitude": 1.0, "seed": 103},
    },
    "topk_kl": {
        "small": {"rows": 9, "split": False, "vocab": 300, "k": 12, "pad": 2, "values": "logprobs", "tail": "renorm",
                  "support": "full", "temperature": 2.0, "teacher_temperature": 1.0, "scale_by_t2": True,
                  "labels": "some", "num_items": None, "reduction": "mean", "layout": "contiguous",
                  "magnitude": 1.0, "student_pad": 0, "quantised": False, "seed": 201},
        "vocab50k": {"rows": 37, "split": True, "vocab": 50257, "k": 64, "pad": 3, "values": "logprobs",
                     "tail": "bucket", "support": "full", "temperature": 2.0, "teacher_temperature": 1.5,
                     "scale_by_t2": True, "labels": "some", "num_items": None, "reduction": "none",
                     "layout": "contiguous", "magnitude": 8.0, "student_pad": 3, "quantised": True, "seed": 202},
        "logits_topk": {"rows": 130, "split": False, "vocab": 4099, "k": 48, "pad": 0, "values": "logits",
                        "tail": "renorm", "support": "topk", "temperature": 0.5, "teacher_temperature": 1.0,
                        "scale_by_t2": False, "labels": None, "num_items": 7, "reduction": "mean",
                        "layout": "contiguous", "magnitude": 1.0, "student_pad": 0, "quantised": False, "seed": 203},
    },
    "plackett_luce": {
        "small": {"lead": [5], "classes": 37, "ties": True, "ignore": 0.3, "permutation": False, "temperature": 1.0,
                  "reduction": "mean", "layout": "contiguous", "magnitude": 3.0, "seed": 301},
        "classes5000": {"lead": [37], "classes": 5000, "ties": True, "ignore": 0.3, "permutation": False,
                        "temperature": 0.5, "reduction": "sum", "layout": "contiguous", "magnitude": 5.0,
                        "seed": 302},
        "ranking_given": {"lead": [4, 9], "classes": 1000, "ties": False, "ignore": 0.0, "permutation": True,
                          "temperature": 4.0, "reduction": "none", "layout": "contiguous", "magnitude": 1.0,
                          "seed": 303},
    },
    "sinkhorn": {
        "small": {"batch": 7, "batch_t": 9, "classes": 3, "temperature": 2.0, "epsilon": 0.1, "n_iters": 20,
                  "scale": 1.0, "layout": "contiguous", "magnitude": 1.0, "seed": 401},
        "b300": {"batch": 300, "batch_t": 257, "classes": 100, "temperature": 2.0, "epsilon": 0.1, "n_iters": 20,
                 "scale": 1e-3, "layout": "contiguous", "magnitude": 2.0, "seed": 402},
        "b1024": {"batch": 1024, "batch_t": 1024, "classes": 5, "temperature": 1.0, "epsilon": 0.01, "n_iters": 7,
                  "scale": -2.5, "layout": "contiguous", "magnitude": 6.0, "seed": 403},
        # few rows, many classes: the cost matrix's B·B'·C work takes the multi-block path
        "c1000": {"batch": 64, "batch_t": 48, "classes": 1000, "temperature": 2.0, "epsilon": 0.1, "n_iters": 20,
                  "scale": 1.0, "layout": "contiguous", "magnitude": 3.0, "seed": 404},
    },
    "token_contextual": {
        "small": {"batch": 2, "tokens": 13, "ds": 8, "dt": 5, "reduction": "mean", "layout": "contiguous",
                  "magnitude": 1.0, "seed": 501},
        "vit": {"batch": 2, "tokens": 197, "ds": 384, "dt": 768, "reduction": "mean", "layout": "contiguous",
                "magnitude": 1.0, "seed": 502},
        "odd_tokens": {"batch": 1, "tokens": 577, "ds": 65, "dt": 33, "reduction": "none", "layout": "contiguous",
                       "magnitude": 3.0, "seed": 503},
    },
    "fused_linear_topk_kl": {
        "small": {"rows": 9, "hidden": 16, "vocab": 300, "k": 12, "pad": 2, "values": "logprobs", "tail": "renorm",
                  "support": "full", "temperature": 2.0, "teacher_temperature": 1.0, "scale_by_t2": True,
                  "labels": "some", "num_items": None, "reduction": "mean", "bias": True, "softcap": None,
                  "chunk_size": 4, "magnitude": 1.0, "quantised": False, "seed": 701},
        "vocab32k": {"rows": 64, "hidden": 128, "vocab": 32000, "k": 64, "pad": 3, "values": "logprobs",
                     "tail": "bucket", "support": "full", "temperature": 2.0, "teacher_temperature": 1.5,
                     "scale_by_t2": True, "labels": "some", "num_items": None, "reduction": "none", "bias": False,
                     "softcap": 30.0, "chunk_size": None, "magnitude": 1.0, "quantised": False, "seed": 702},
        "chunks": {"rows": 300, "hidden": 64, "vocab": 5003, "k": 32, "pad": 0, "values": "logits", "tail": "renorm",
                   "support": "topk", "temperature": 0.5, "teacher_temperature": 1.0, "scale_by_t2": False,
                   "labels": None, "num_items": 7, "reduction": "mean", "bias": True, "softcap": None,
                   "chunk_size": 37, "magnitude": 3.0, "quantised": False, "seed": 703},
    },
    "token_graph": {
        "small": {"nodes": 20, "ds": 6, "dt": 9, "k": 4, "graph": "teacher", "sigma": 2.0, "edge": "kernel",
                  "kl_direction": "student_teacher", "reduction": "mean", "layout": "contiguous", "magnitude": 1.0,
                  "seed": 601},
        "m1024": {"nodes": 1024, "ds": 384, "dt": 768, "k": 8, "graph": "teacher", "sigma": 32.0, "edge": "kernel",
                  "kl_direction": "student_teacher", "reduction": "mean", "layout": "contiguous", "magnitude": 1.0,
                  "seed": 602},
        "random_edges": {"nodes": 300, "ds": 33, "dt": 17, "k": 12, "graph": "random", "sigma": 8.0,
                         "edge": "log_kernel", "kl_direction": "teacher_student", "reduction": "none",
                         "layout": "contiguous", "magnitude": 3.0, "seed": 603},
    },
    "token_contrastive": {
        "small": {"nodes": 13, "dim": 7, "temperature": 0.5, "similarity": "cosine", "symmetric": False,
                  "detach_teacher": False, "reduction": "mean", "layout": "contiguous", "magnitude": 1.0,
                  "seed": 801},
        "strips": {"nodes": 1300, "dim": 48, "temperature": 0.07, "similarity": "cosine", "symmetric": True,
                   "detach_teacher": False, "reduction": "none", "layout": "contiguous", "magnitude": 1.0,
                   "seed": 802},
        "dot_m2100": {"nodes": 2100, "dim": 40, "temperature": 2.0, "similarity": "dot", "symmetric": False,
                      "detach_teacher": True, "reduction": "sum", "layout": "contiguous", "magnitude": 1.0,
                      "seed": 803},
    },
}


def relayout(t, layout: str):
    """``t`` with the same values (and ``requires_grad``) in ``layout``; non-tensors, 0-d and empty
    tensors are returned as they are. See the module docstring for the layouts."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.numel() == 0 or layout == "contiguous":
        return t
    if layout == "misaligned" or (layout == "padded_rows" and t.dim() == 1):
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
        flat[1:] = t.detach().reshape(-1)
        out = flat[1:].view(t.shape)
    elif layout == "padded_rows":
        width = t.shape[-1]
        wide = torch.zeros(*t.shape[:-1], width + 3, dtype=t.dtype, device=t.device)
        wide[..., 1:width + 1] = t.detach()
        out = wide[..., 1:width + 1]
    elif layout == "strided":
        return non_contiguous(t.detach()).requires_grad_(t.requires_grad)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return out.detach().requires_grad_(t.requires_grad)


def relayout_built(built: Built, layout: str) -> Built:
    """Every tensor of a built case — inputs and constants — in ``layout``."""
    inputs = tuple(relayout(x, layout) for x in built.inputs)
    constants = {name: relayout(value, layout) for name, value in built.constants.items()}
    return Built(inputs, constants, built.upstream_seed)


def upstream_gradient(out: torch.Tensor, seed: int) -> torch.Tensor:
    """The random weight the outputs are contracted with (as in :func:`kdloss.testing.check_case`)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)


def differentiable(built: Built) -> list[torch.Tensor]:
    return [x for x in built.inputs if x.requires_grad]


def backward(out: torch.Tensor, built: Built, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of ``(out · weight).sum()`` for every differentiable input (zeros where unused)."""
    need = differentiable(built)
    if not need or not out.requires_grad:
        return tuple(torch.zeros_like(x) for x in need)
    grads = torch.autograd.grad(out, need, grad_outputs=weight, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(need, grads, strict=True))


@dataclass
class Run:
    """The value and gradients of one kernel call, with the built inputs they came from."""

    built: Built
    outputs: list[torch.Tensor]


def run_case(loss: str, case: dict, device, dtype: torch.dtype, layout: str = "contiguous",
             fn: str = "kernel") -> Run:
    """Builds ``case`` on ``device``/``dtype`` in ``layout`` and runs the spec's ``fn`` ("kernel" or
    "naive") forward and backward."""
    spec = get(loss)
    built = relayout_built(spec.build(case, torch.device(device), dtype), layout)
    out = getattr(spec, fn)(case, *built.inputs, **built.constants)
    grads = backward(out, built, upstream_gradient(out, built.upstream_seed))
    return Run(built, [out.detach(), *grads])


def _exact(loss: str, case: dict, built: Built) -> list[torch.Tensor]:
    spec = get(loss)
    inputs = tuple(x.detach().to("cpu", torch.float64).requires_grad_(x.requires_grad) for x in built.inputs)
    constants = {k: (v.to("cpu") if isinstance(v, torch.Tensor) else v) for k, v in built.constants.items()}
    exact_built = Built(inputs, constants, built.upstream_seed)
    out = spec.reference(case, *inputs, **constants)
    return [out.detach(), *backward(out, exact_built, upstream_gradient(out, built.upstream_seed))]


def compare_devices(loss: str, case: dict, device, dtype: torch.dtype, layout: str = "contiguous",
                    baseline_device="cpu") -> CheckResult:
    """The kernel on ``device`` (inputs in ``layout``) against the kernel on ``baseline_device``
    (contiguous inputs) and the float64 reference, with the error rule of :func:`kdloss.testing.check_case`:
    for the value and every gradient, each kernel's error against the reference stays within the bound
    built from the naive eager error on its own device, and the two kernels differ by at most the larger
    of the two bounds. Outputs must keep the input's device, shape and dtype."""
    target = run_case(loss, case, device, dtype, layout)
    baseline = run_case(loss, case, baseline_device, dtype)
    exact = _exact(loss, case, baseline.built)
    if dtype == torch.float64:
        naive_target = naive_baseline = exact
    else:
        naive_target = run_case(loss, case, device, dtype, fn="naive").outputs
        naive_baseline = run_case(loss, case, baseline_device, dtype, fn="naive").outputs
    want = torch.device(device)
    labels = ["value"] + [f"grad[{i}]" for i in range(len(exact) - 1)]
    results = []
    columns = zip(labels, target.outputs, baseline.outputs, exact, naive_target, naive_baseline, strict=True)
    for label, t, b, e, nt, nb in columns:
        bound_t, bound_b = error_bound(nt, e, dtype), error_bound(nb, e, dtype)
        placed = t.device == want if want.index is not None else t.device.type == want.type
        same_form = placed and tuple(t.shape) == tuple(b.shape) == tuple(e.shape) and t.dtype == b.dtype
        # each kernel against its own device's naive error; their difference against the larger bound
        ratios = [(max_abs(t, e), bound_t), (max_abs(b, e), bound_b), (max_abs(t, b), max(bound_t, bound_b))]
        err, bound = max(ratios, key=lambda r: r[0] / r[1] if r[1] > 0 else (0.0 if r[0] == 0 else float("inf")))
        ok = same_form and all(x <= y for x, y in ratios)
        results.append(CheckResult(ok, err, bound, label))
    failing = [r for r in results if not r.ok]
    worst = max(failing or results, key=lambda r: r.ratio)
    details = [f"{r.what}: worst of |{device} - exact|, |{baseline_device} - exact|, |{device} - {baseline_device}|"
               f" {r.error:.3e} vs bound {r.bound:.3e}{'' if r.ok else '  <-- FAIL'}" for r in results]
    return CheckResult(not failing, worst.error, worst.bound, worst.what, details)
