"""SinKD benchmarks: `python benchmarks/bench_sinkhorn.py [--device cuda] [--quick]`.

Same harness as `python -m kdloss.bench --loss sinkhorn` (cases in kdloss/bench/sinkhorn.py).
"""

import sys

from kdloss.bench import main

if __name__ == "__main__":
    sys.exit(main(["--loss", "sinkhorn", *sys.argv[1:]]))
