"""Fused linear head + top-k KL benchmarks:
`python benchmarks/bench_fused_linear_topk_kl.py [--device cuda] [--quick]`.

Same harness as `python -m kdloss.bench --loss fused_linear_topk_kl` (cases in
kdloss/bench/fused_linear_topk_kl.py); the peak-memory column shows what chunking saves.
"""

import sys

from kdloss.bench import main

if __name__ == "__main__":
    sys.exit(main(["--loss", "fused_linear_topk_kl", *sys.argv[1:]]))
