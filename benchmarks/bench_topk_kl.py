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


def bandwidth_report(device: str, dtypes) -> None:
    print("\n| shape | dtype | kdloss fwd+bwd ms | achieved GB/s | copy GB/s | fraction |")
    print("|---|---|---|---|---|---|")
    for dtype in dtypes:
        for rows, vocab, k in GPU_SHAPES if device == "cuda" else CPU_SHAPES:
            z, ids, lp = make_inputs(rows, vocab, k, device, dtype)
            for _ in range(2):
                torch.autograd.grad(kernel(z, ids, lp), z)
            samples = []
            for _ in range(10):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                torch.autograd.grad(kernel(z, ids, lp), z)
                if device == "cuda":
                    torch.cuda.synchronize()
                samples.append(time.perf_counter() - t0)
            ms = sorted(samples)[len(samples) // 2] * 1e3
            gbps = 3 * z.numel() * z.element_size() / (ms / 1e3) / 1e9
            copy = copy_gbps(z.numel(), dtype, device)
            print(f"| N={rows} V={vocab} k={k} | {str(dtype).replace('torch.', '')} | {ms:.2f} | {gbps:.1f} | "
                  f"{copy:.1f} | {gbps / copy:.0%} |")


if __name__ == "__main__":
    code = main(["--loss", "topk_kl", *sys.argv[1:]])
    if "--quick" not in sys.argv:
        device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else (
            "cuda" if torch.cuda.is_available() else "cpu")
        bandwidth_report(device, [torch.float32, torch.bfloat16])
    sys.exit(code)
