"""TRG contextual-loss benchmarks: `python benchmarks/bench_trg.py [--device cuda] [--quick]`.

Same harness as `python -m kdloss.bench --loss trg` (cases in kdloss/bench/trg.py).
"""

import sys

from kdloss.bench import main

if __name__ == "__main__":
    sys.exit(main(["--loss", "trg", *sys.argv[1:]]))
