"""PLD benchmarks: `python benchmarks/bench_plackett_luce.py [--device cuda] [--quick] [--repeat R]`.

Same harness as `python -m kdloss.bench --loss plackett_luce` (cases in kdloss/bench/plackett_luce.py).
"""

import sys

from kdloss.bench import main

if __name__ == "__main__":
    sys.exit(main(["--loss", "plackett_luce", *sys.argv[1:]]))
