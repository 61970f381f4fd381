"""Top-k sparse KL benchmark cases: kdloss kernel vs eager DistillKit-style code vs
torch.compile of it (Liger-Kernel has no sparse-teacher loss; its dense KL needs a GPU and a
dense [N, V] teacher).

Every case is forward + backward of the default variant (teacher renormalised over its k ids,
full-vocabulary student, T = 2, × T², mean over rows). Cases: ``[N, V]`` student logits; the logits
as an LLM gives them, the label-shift slice ``full[:, :-1]`` of ``[B, T + 1, V]`` (gradients w.r.t. the
slice: autograd's slice backward, a zero ``[B, T + 1, V]`` tensor and a copy into it, comes after the loss
and is the same for every implementation); LLM vocabularies V = 50257 and 151936 (small N on CPU).
``kdloss`` computes the gradient in the forward (one pass over the logits); ``kdloss two-pass`` is
``precompute_grad=False``.

Bandwidth: ``python -m kdloss.bench.topk_kl`` also reports, per case, the bytes the kernel must move (one
read of the logits, one write of the gradient) over its median time, against the copy bandwidth measured
on the same tensor (``torch.empty_like(x).copy_(x)``: one read and one write of it).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from ..functional import topk_kl_loss
from . import Case

CPU_SHAPES = [(2048, 32000, 64), (8192, 32000, 64)]  # (N, V, k)
GPU_SHAPES = [(2048, 32000, 64), (16384, 151936, 64)]
QUICK_SHAPES = [(64, 4096, 16), (256, 8192, 32)]
#: (B, T, V, k): full[:, :-1] of [B, T + 1, V] logits
CPU_SHIFTED = [(4, 512, 32000, 64)]
GPU_SHIFTED = [(8, 2048, 151936, 64)]
QUICK_SHIFTED = [(2, 64, 4096, 16)]
#: LLM vocabularies: (N, V, k)
CPU_LLM_VOCABS = [(512, 50257, 64), (128, 151936, 64)]
GPU_LLM_VOCABS = [(16384, 50257, 64)]
TEMPERATURE = 2.0


def eager_distillkit(student_logits, teacher_ids, teacher_logprobs):
    """DistillKit's recipe in eager PyTorch: fp32 log-softmax of the whole student row, teacher
    power-transformed and renormalised over its ids, KL × T², mean over rows."""
    t = TEMPERATURE
    log_q = torch.log_softmax(student_logits.float() / t, dim=-1).gather(-1, teacher_ids)
    log_p = torch.log_softmax(teacher_logprobs.float() / t, dim=-1)
    rows = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (rows.mean() * t * t).to(student_logits.dtype)


def kernel(student_logits, teacher_ids, teacher_logprobs):
    return topk_kl_loss(student_logits, teacher_ids, teacher_logprobs, temperature=TEMPERATURE, backend="kernel")


def kernel_two_pass(student_logits, teacher_ids, teacher_logprobs):
    return topk_kl_loss(student_logits, teacher_ids, teacher_logprobs, temperature=TEMPERATURE, backend="kernel",
                        precompute_grad=False)


def make_inputs(rows: int, vocab: int, k: int, device: str, dtype: torch.dtype, seed: int = 0, lead=None):
    """Student logits (``dtype``: a leaf ``[rows, V]``, or with ``lead = (B, T + 1)`` the label-shift slice
    ``full[:, :-1]`` of a leaf ``[B, T + 1, V]``, a strided view), distinct teacher ids and fp32 full-softmax
    log-probs for ``rows`` positions."""
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, vocab) if lead is None else (*lead, vocab)
    logits = (2.0 * torch.randn(shape, generator=gen)).to(device, dtype).requires_grad_()
    if lead is not None:
        logits = logits[:, :-1]
    positions = (rows,) if lead is None else (lead[0], lead[1] - 1)
    stride = vocab // k  # one id per stride-wide bucket: distinct within a row
    ids = torch.arange(k) * stride + torch.randint(0, stride, (*positions, k), generator=gen)
    logprobs = torch.log_softmax(torch.randn(*positions, k, generator=gen), -1) - 0.3
    return logits, ids.to(device), logprobs.to(device)


def _impls(compiled) -> dict:
    return {"kdloss": kernel, "kdloss two-pass": kernel_two_pass, "eager": eager_distillkit, "compile": compiled}


def cases(device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    gpu = device == "cuda"
    shapes = QUICK_SHAPES if quick else (GPU_SHAPES if gpu else CPU_SHAPES)
    shapes = shapes + ([] if quick else (GPU_LLM_VOCABS if gpu else CPU_LLM_VOCABS))
    shifted_shapes = QUICK_SHIFTED if quick else (GPU_SHIFTED if gpu else CPU_SHIFTED)
    compiled = torch.compile(eager_distillkit)
    out = []
    for dtype in dtypes:
        for rows, vocab, k in shapes:
            out.append(Case("topk_kl", "renorm T=2", f"N={rows} V={vocab} k={k}", dtype, device,
                            lambda r=rows, v=vocab, kk=k, d=dtype: make_inputs(r, v, kk, device, d),
                            _impls(compiled)))
        for batch, seq, vocab, k in shifted_shapes:
            out.append(Case("topk_kl", "renorm T=2 full[:, :-1]", f"B={batch} T={seq} V={vocab} k={k}", dtype, device,
                            lambda b=batch, s=seq, v=vocab, kk=k, d=dtype: make_inputs(b * s, v, kk, device, d,
                                                                                       lead=(b, s + 1)),
                            _impls(compiled)))
    return out


# ---------------------------------------------------------------------------------------------
# Bandwidth report: python -m kdloss.bench.topk_kl


def copy_gbps(x: torch.Tensor, repeat: int) -> float:
    """Copy bandwidth on ``x`` (GB/s, one read and one write of it, a fresh output each time)."""
    from . import summarize

    samples = []
    for i in range(repeat + 2):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = torch.empty_like(x).copy_(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= 2:
            samples.append((time.perf_counter() - t0) * 1e3)
        del y
    return 2 * x.numel() * x.element_size() / summarize(samples).median_ms / 1e6


def bandwidth_rows(device: str, dtypes: list[torch.dtype], quick: bool, repeat: int) -> list[dict]:
    """Per case and implementation: median ms, × eager, × compile, and for kdloss the achieved bandwidth
    (one read of the logits + one write of the gradient over the median time) against the copy bandwidth."""
    from . import peak_mib, time_step

    rows = []
    for case in cases(device, dtypes, quick):
        inputs = case.make_inputs()
        logits = inputs[0]
        moved = 2 * logits.numel() * logits.element_size()
        copy = copy_gbps(logits.detach(), repeat)
        times = {}
        for backend, fn in case.impls.items():
            try:
                timing = time_step(fn, inputs, device, repeat)
            except Exception as exc:  # torch.compile failing is a result
                print(f"  {case.shape} {backend}: failed ({type(exc).__name__})", file=sys.stderr)
                continue
            times[backend] = timing.median_ms
            rows.append({"case": case.name, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""),
                         "backend": backend, "median_ms": timing.median_ms, "spread": timing.spread,
                         "peak_mib": peak_mib(fn, inputs, device), "moved_gb": moved / 1e9,
                         "gbps": moved / timing.median_ms / 1e6, "copy_gbps": copy})
        for row in rows:
            if row["shape"] == case.shape and row["case"] == case.name and row["dtype"] == rows[-1]["dtype"]:
                row["x_eager"] = times.get("eager", float("nan")) / row["median_ms"]
                row["x_compile"] = times.get("compile", float("nan")) / row["median_ms"]
    return rows


def format_bandwidth(rows: list[dict]) -> str:
    lines = ["| case | shape | dtype | backend | median ms | spread | × eager | × compile | peak MiB | GB/s | "
             "copy GB/s | of copy |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['case']} | {r['shape']} | {r['dtype']} | {r['backend']} | {r['median_ms']:.2f} | "
                     f"{100 * r['spread']:.0f} % | {r['x_eager']:.2f} | {r['x_compile']:.2f} | {r['peak_mib']:.0f} | "
                     f"{r['gbps']:.1f} | {r['copy_gbps']:.1f} | {r['gbps'] / r['copy_gbps']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m kdloss.bench.topk_kl [--device D] [--dtype T ...] [--repeat R] [--threads N] [--quick]
    [--only SUBSTRING]``: the table of :func:`bandwidth_rows`. ``THP_MEM_ALLOC_ENABLE`` (torch's switch for
    huge pages in its CPU allocator) is reported: run once with and once without it."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kdloss.bench.topk_kl", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="keep the cases whose shape contains this text (e.g. 'V=32000')")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global cases
    all_cases = cases
    if args.only:
        def cases(device, dtypes, quick):  # noqa: F811 — filtered view of the case list
            return [c for c in all_cases(device, dtypes, quick) if args.only in c.shape]
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float32", "bfloat16"])]
    print(f"device {args.device}, threads {torch.get_num_threads()}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '')!r}, torch {torch.__version__}")
    print(format_bandwidth(bandwidth_rows(args.device, dtypes, args.quick, args.repeat)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
