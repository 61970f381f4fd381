"""Fused linear head + top-k KL benchmarks:
`python benchmarks/bench_fused_linear_topk_kl.py [--device cuda] [--quick] [--dtype float32]`.

Same harness as `python -m kdloss.bench --loss fused_linear_topk_kl` (cases in
kdloss/bench/fused_linear_topk_kl.py), then, on CPU, each implementation's extra peak memory of one
forward + backward measured as the growth of the process's peak RSS in a fresh subprocess (the
profiler-based column of the harness does not see every allocation of a GEMM-heavy step).
"""

import subprocess
import sys

from kdloss.bench import main

PROBE = """
import resource, sys, torch
from kdloss.bench import fused_linear_topk_kl as b
rows, hidden, vocab, k = b.CPU_SHAPES[int(sys.argv[2])]
h, w, ids, lp = b.make_inputs(rows, hidden, vocab, k, "cpu", torch.float32)
fn = {"kdloss": b.fused, "kdloss-unfused": b.unfused, "eager": b.eager}[sys.argv[1]]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.autograd.grad(fn(h, w, ids, lp), (h, w))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def rss_report() -> None:
    from kdloss.bench.fused_linear_topk_kl import CPU_SHAPES

    print("\n| shape | implementation | extra peak RSS MiB (fwd+bwd, fp32, first call) |\n|---|---|---|")
    for index, (rows, hidden, vocab, k) in enumerate(CPU_SHAPES):
        for name in ("kdloss", "kdloss-unfused", "eager"):
            out = subprocess.run([sys.executable, "-c", PROBE, name, str(index)], capture_output=True, text=True,
                                 check=True)
            mib = float(out.stdout.strip().splitlines()[-1])
            print(f"| N={rows} H={hidden} V={vocab} k={k} | {name} | {mib:.0f} |")


if __name__ == "__main__":
    code = main(["--loss", "fused_linear_topk_kl", *sys.argv[1:]])
    if "--device" not in sys.argv and "--quick" not in sys.argv:
        rss_report()
    sys.exit(code)
