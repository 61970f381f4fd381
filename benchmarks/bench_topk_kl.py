"""Top-k sparse KL benchmarks: `python benchmarks/bench_topk_kl.py [--device cuda] [--quick]`.

Same harness as `python -m kdloss.bench --loss topk_kl` (cases in kdloss/bench/topk_kl.py), followed
by the achieved bandwidth of the kernel: forward reads the logits once, backward reads them again
and writes the gradient (3·N·V elements), against this machine's measured copy bandwidth.
"""

import sys
import time

import torch

from kdloss.bench import main
from kdloss.bench.topk_kl import CPU_SHAPES, GPU_SHAPES, kernel, make_inputs


def copy_gbps(numel: int, dtype: torch.dtype, device: str) -> float:
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    dst.copy_(src)
    samples = []
    for _ in range(10):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / sorted(samples)[len(samples) // 2] / 1e9


def _median_ms(fn, device: str, repeat: int = 7) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return sorted(samples)[len(samples) // 2] * 1e3


def bandwidth_report(device: str, dtypes) -> None:
    """Achieved bandwidth of forward + backward (3·N·V elements moved). On CPU the fresh gradient's
    first touch (page faults, paid by every implementation) is timed separately and also shown
    subtracted, since on VMs it can cost more than the kernel itself."""
    print("\n| shape | dtype | fwd+bwd ms | GB/s | first touch of the gradient ms | GB/s without it | copy GB/s | "
          "fraction (without) |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for rows, vocab, k in GPU_SHAPES if device == "cuda" else CPU_SHAPES:
            z, ids, lp = make_inputs(rows, vocab, k, device, dtype)
            ms = _median_ms(lambda z=z, ids=ids, lp=lp: torch.autograd.grad(kernel(z, ids, lp), z), device)
            touch = 0.0 if device == "cuda" else _median_ms(lambda z=z: torch.empty_like(z).fill_(0), device)
            moved = 3 * z.numel() * z.element_size() / 1e9
            copy = copy_gbps(z.numel(), dtype, device)
            without = moved / (ms - touch) * 1e3
            name = str(dtype).replace("torch.", "")
            print(f"| N={rows} V={vocab} k={k} | {name} | {ms:.1f} | {moved / ms * 1e3:.1f} | "
                  f"{touch:.1f} | {without:.1f} | {copy:.1f} | {without / copy:.0%} |")


if __name__ == "__main__":
    code = main(["--loss", "topk_kl", *sys.argv[1:]])
    if "--quick" not in sys.argv:
        device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else (
            "cuda" if torch.cuda.is_available() else "cpu")
        bandwidth_report(device, [torch.float32, torch.bfloat16])
    sys.exit(code)
