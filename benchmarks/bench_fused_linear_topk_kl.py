"""Fused linear head + top-k KL benchmarks:
`python benchmarks/bench_fused_linear_topk_kl.py [--device cuda] [--quick] [--dtype float32]`.

Same harness as `python -m kdloss.bench --loss fused_linear_topk_kl` (cases in
kdloss/bench/fused_linear_topk_kl.py). On CPU (full shapes) it adds `--rss`: each implementation's
peak extra RSS of one step in a fresh process, which also sees the allocations of the GEMM-heavy
step that the harness's profiler-based column misses.
"""

import sys

from kdloss.bench import main

if __name__ == "__main__":
    args = ["--loss", "fused_linear_topk_kl", *sys.argv[1:]]
    if "--device" not in sys.argv and "--quick" not in sys.argv:
        args.append("--rss")
    sys.exit(main(args))
