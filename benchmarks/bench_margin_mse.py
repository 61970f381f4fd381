"""Margin-MSE benchmarks: `python benchmarks/bench_margin_mse.py [--device cuda] [--quick]`.

Same harness as `python -m kdloss.bench --loss margin_mse` (cases in kdloss/bench/margin_mse.py).
"""

import sys

from kdloss.bench import main

if __name__ == "__main__":
    sys.exit(main(["--loss", "margin_mse", *sys.argv[1:]]))
