"""Fused linear head + top-k KL benchmark cases: kdloss fused vs kdloss unfused (``hidden @ Wᵀ``
then ``topk_kl_loss``) vs eager DistillKit-style code (``F.linear`` + the eager top-k KL formula +
autograd) vs torch.compile of it, forward + backward, time and peak extra memory.

Each shape runs twice: a trained head (gradients for ``hidden`` and ``weight``) and a frozen head
(``weight.requires_grad = False``: only ``hidden``'s gradient, as with a frozen or LoRA-adapted LM
head). On CPU the LLM vocabularies (GPT-2's 50257, Qwen's 151936) run with a small ``N`` so that a
step stays around a second on two cores.

One shape alone, with the process CPU time next to the wall time (steadier on a shared machine)::

    python -m kdloss.bench.fused_linear_topk_kl --shape 1024,1024,32000,64 --dtype float32 --rss --repeat 5
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..functional import fused_linear_topk_kl_loss, topk_kl_loss
from . import Case
from .topk_kl import TEMPERATURE, eager_distillkit

CPU_SHAPES = [(1024, 1024, 32000, 64), (4096, 256, 32000, 64),  # (N, H, V, k); the 2nd: logits ≫ weight
              (256, 1024, 50257, 64), (128, 512, 151936, 64)]    # LLM vocabularies, small N
GPU_SHAPES = [(8192, 4096, 151936, 64), (8192, 4096, 50257, 64)]
QUICK_SHAPES = [(64, 64, 2048, 16), (256, 64, 8192, 16)]


def fused(hidden, weight, ids, logprobs):
    return fused_linear_topk_kl_loss(hidden, weight, ids, logprobs, temperature=TEMPERATURE, backend="kernel")


def unfused(hidden, weight, ids, logprobs):
    return topk_kl_loss(F.linear(hidden, weight), ids, logprobs, temperature=TEMPERATURE, backend="kernel")


def eager(hidden, weight, ids, logprobs):
    return eager_distillkit(F.linear(hidden, weight), ids, logprobs)


def make_inputs(rows: int, hidden: int, vocab: int, k: int, device: str, dtype: torch.dtype, seed: int = 0,
                frozen: bool = False):
    """``hidden [N, H]`` (needs a gradient), ``weight [V, H]`` (needs one unless ``frozen``), distinct
    teacher ids and fp32 log-probs."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, dtype).requires_grad_(not frozen)
    stride = vocab // k
    ids = torch.arange(k) * stride + torch.randint(0, stride, (rows, k), generator=gen)
    logprobs = torch.log_softmax(torch.randn(rows, k, generator=gen), -1) - 0.3
    return h, w, ids.to(device), logprobs.to(device)


def _case(shape, dtype, device, frozen: bool, compiled) -> Case:
    rows, hidden, vocab, k = shape
    name = "renorm T=2" + (" frozen head" if frozen else "")
    return Case("fused_linear_topk_kl", name, f"N={rows} H={hidden} V={vocab} k={k}", dtype, device,
                lambda: make_inputs(rows, hidden, vocab, k, device, dtype, frozen=frozen),
                {"kdloss": fused, "kdloss-unfused": unfused, "eager": eager, "compile": compiled})


def cases(device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    shapes = QUICK_SHAPES if quick else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    compiled = torch.compile(eager)
    return [_case(shape, dtype, device, frozen, compiled)
            for dtype in dtypes for shape in shapes for frozen in (False, True)]


def _cpu_times(fn, inputs, repeat: int) -> tuple[float, float]:
    """Median wall and process-CPU ms of ``repeat`` forward+backward steps after one warm-up. On a
    shared machine the CPU time (with one thread) is the steadier figure: it leaves out time spent
    waiting for a core."""
    import statistics
    import time

    from . import _step

    _step(fn, inputs)
    wall, cpu = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        _step(fn, inputs)
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def _child_rss(args) -> float:
    """Peak extra RSS (MiB) of one implementation's step, measured in a fresh interpreter."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # as kdloss.bench: large blocks visible to VmHWM
    result = subprocess.run([sys.executable, "-m", "kdloss.bench.fused_linear_topk_kl", "--rss-child",
                             json.dumps(args)], capture_output=True, text=True, timeout=1800, env=env)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-500:])
    return float(result.stdout.strip().splitlines()[-1])


def _interleaved(shape, dtype, device, heads, names, rounds: int, compiled) -> int:
    """One step of each implementation in turn, ``rounds`` times (so that a busy spell of a shared
    machine hits them all alike); prints min / median process-CPU ms per implementation."""
    import statistics
    import time

    from . import _step

    print("| head | backend | min CPU ms | median CPU ms |\n|---|---|---|---|")
    for head in heads:
        case = _case(shape, dtype, device, head == "frozen", compiled)
        inputs = {name: case.make_inputs() for name in names}
        for name in names:
            _step(case.impls[name], inputs[name])
        cpu = {name: [] for name in names}
        for _ in range(rounds):
            for name in names:
                start = time.process_time()
                _step(case.impls[name], inputs[name])
                cpu[name].append((time.process_time() - start) * 1e3)
        for name in names:
            print(f"| {head} | {name} | {min(cpu[name]):.0f} | {statistics.median(cpu[name]):.0f} |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """One shape, trained and/or frozen head: median wall and CPU ms of forward+backward, peak extra
    memory from the profiler (``peak MiB``, as ``python -m kdloss.bench``) and, with ``--rss``, the
    peak extra RSS of a step in a fresh process (sees memory freed inside ops)."""
    import argparse
    import json

    from . import peak_mib, step_peak_rss_mib

    parser = argparse.ArgumentParser(prog="python -m kdloss.bench.fused_linear_topk_kl")
    parser.add_argument("--shape", default="1024,1024,32000,64", help="N,H,V,k")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--head", action="append", choices=["trained", "frozen"], help="default: both")
    parser.add_argument("--impl", action="append", help="implementations to run (default: kdloss, eager, compile)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss", action="store_true", help="also the peak extra RSS (CPU, fresh process each)")
    parser.add_argument("--interleave", type=int, metavar="ROUNDS",
                        help="instead: ROUNDS rounds of one step per implementation in turn; min / median CPU ms")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        child = json.loads(args.rss_child)
        dtype = getattr(torch, child["dtype"])
        case = _case(tuple(child["shape"]), dtype, "cpu", child["frozen"], torch.compile(eager))
        print(step_peak_rss_mib(case.impls[child["impl"]], case.make_inputs()))
        return 0
    shape = tuple(int(x) for x in args.shape.split(","))
    compiled = torch.compile(eager)
    if args.interleave:
        return _interleaved(shape, getattr(torch, args.dtype), args.device, args.head or ["trained", "frozen"],
                            args.impl or ["kdloss", "eager", "compile"], args.interleave, compiled)
    print("| head | backend | wall ms | CPU ms | peak MiB | peak RSS MiB |\n|---|---|---|---|---|---|")
    for head in args.head or ["trained", "frozen"]:
        case = _case(shape, getattr(torch, args.dtype), args.device, head == "frozen", compiled)
        for name in args.impl or ["kdloss", "eager", "compile"]:
            inputs = case.make_inputs()
            wall, cpu = _cpu_times(case.impls[name], inputs, args.repeat)
            mib = peak_mib(case.impls[name], inputs, args.device)
            rss = float("nan")
            if args.rss and args.device == "cpu":
                rss = _child_rss({"shape": shape, "dtype": args.dtype, "frozen": head == "frozen", "impl": name,
                                  "threads": args.threads})
            print(f"| {head} | {name} | {wall:.0f} | {cpu:.0f} | {mib:.1f} | {rss:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
