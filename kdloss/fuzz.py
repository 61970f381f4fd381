"""Parity fuzzer: checks every kdloss kernel against its float64 reference on this machine.

    python -m kdloss.fuzz [--loss NAME] [--device cpu|cuda] [--dtype float32 ...]
                          [--minutes M | --examples N | --long] [--seed S]

Each (loss, device, dtype) is a cell. Inputs come from the hypothesis strategies each loss registers
in kdloss.testing (covering its hard corners); for every case the kernel's value and gradients
are compared with the fp64 reference under the error rule of docs/verifying.md. A failing case is
shrunk to a minimal one and printed as a ready-to-paste Python snippet. One progress line is printed
per finished cell, then a verdict table. Exit code 1 on any failure, 2 when hypothesis is missing.

Budgets: --examples N cases per cell (default 100); --minutes M a total time budget shared
by the cells (each cell gets what is left divided by the cells still to run); --long the
scheduled-style run: 3000 cases per cell with a fresh random seed (printed, so a failure can be
rerun with --seed). The fuzzer needs hypothesis: pip install 'kdloss[fuzz]'.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field

import torch

from . import testing

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Tally:
    """Results of one (loss, device, dtype) run."""

    loss: str
    device: str
    dtype: torch.dtype
    examples: int = 0
    worst: testing.CheckResult | None = None
    failure: testing.CheckResult | None = None
    case: dict | None = None  # the minimal failing case, when one failed
    reproducer: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.failure is None and not self.errors

    def record(self, result: testing.CheckResult) -> None:
        self.examples += 1
        if self.worst is None or result.ratio > self.worst.ratio:
            self.worst = result


class _CaseFailed(AssertionError):
    pass


def _run_chunk(spec, device: str, dtype: torch.dtype, examples: int, seed: int, tally: Tally) -> bool:
    """One hypothesis run of ``examples`` cases; on failure stores the shrunk case. True if clean."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    last: dict = {}

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    @given(spec.strategy())
    def prop(case):
        last["case"] = case
        result = testing.check_case(spec.name, case, device, dtype)
        tally.record(result)
        last["result"] = result
        if not result.ok:
            raise _CaseFailed(str(result))

    try:
        prop()
        return True
    except Exception as exc:  # hypothesis re-runs the minimal failing case last
        case = last.get("case")
        if isinstance(exc, _CaseFailed) or (case is not None and not last["result"].ok):
            tally.failure = last["result"]
        else:
            tally.errors.append(f"{type(exc).__name__}: {exc}")
        if case is not None:
            tally.case = case
            tally.reproducer = testing.reproducer(spec.name, case, device, dtype)
        return False


def fuzz(loss: str, device: str, dtype: torch.dtype, *, examples: int | None = None,
         minutes: float | None = None, seed: int = 0, chunk: int | None = None) -> Tally:
    """Runs one (loss, device, dtype) until ``examples`` cases ran or ``minutes`` elapsed (checked
    between chunks of cases: 10 per chunk under a time budget, 50 otherwise)."""
    spec = testing.get(loss)
    tally = Tally(loss, device, dtype)
    timed = minutes is not None and examples is None
    deadline = time.monotonic() + 60 * minutes if timed else None
    remaining = None if timed else (examples if examples is not None else 100)
    chunk = chunk or (10 if timed else 50)
    round_seed = seed
    while True:
        size = chunk if remaining is None else min(chunk, remaining)
        if size <= 0 or not _run_chunk(spec, device, dtype, size, round_seed, tally):
            break
        round_seed += 1
        if remaining is not None:
            remaining -= size
        if deadline is not None and time.monotonic() >= deadline:
            break
    return tally


def format_table(tallies: list[Tally]) -> str:
    lines = ["| loss | device | dtype | examples | worst error | its bound | verdict |",
             "|---|---|---|---|---|---|---|"]
    for t in tallies:
        worst = t.failure or t.worst
        err = f"{worst.error:.3e} ({worst.what})" if worst else "-"
        bound = f"{worst.bound:.3e}" if worst else "-"
        verdict = "PASS" if t.passed else ("FAIL" if t.failure else "ERROR")
        dtype = str(t.dtype).replace("torch.", "")
        lines.append(f"| {t.loss} | {t.device} | {dtype} | {t.examples} | {err} | {bound} | {verdict} |")
    return "\n".join(lines)


LONG_EXAMPLES = 3000
MISSING_HYPOTHESIS = ("python -m kdloss.fuzz needs hypothesis, which is not installed: "
                      "pip install 'kdloss[fuzz]' (or pip install hypothesis)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kdloss.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", action="append", choices=testing.names(), help="default: every loss")
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="default: cpu, and cuda when a GPU is visible")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="default: every dtype the loss has")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="total time budget, shared by all cells")
    budget.add_argument("--examples", type=int, help="cases per (loss, device, dtype) cell; default 100")
    budget.add_argument("--long", action="store_true",
                        help=f"scheduled-style run: {LONG_EXAMPLES} cases per cell, random seed unless --seed")
    parser.add_argument("--seed", type=int, help="hypothesis seed (default 0; random with --long)")
    return parser


def cells(losses: list[str] | None, devices: list[str], dtypes: list[str] | None) -> list[tuple[str, str, torch.dtype]]:
    """Every (loss, device, dtype) to fuzz, in order."""
    out = []
    for loss in losses or testing.names():
        spec = testing.get(loss)
        for device in devices:
            for dtype in [DTYPES[d] for d in dtypes] if dtypes else spec.dtypes:
                out.append((loss, device, dtype))
    return out


def progress_line(index: int, total: int, tally: Tally, seconds: float) -> str:
    """One line per finished cell: which, how many cases, how long, how close to the bound."""
    dtype = str(tally.dtype).replace("torch.", "")
    worst = tally.failure or tally.worst
    closest = f"worst {worst.ratio:.2f} of its bound ({worst.what})" if worst else "no cases"
    verdict = "PASS" if tally.passed else ("FAIL" if tally.failure else "ERROR")
    return (f"[{index}/{total}] {tally.loss} {tally.device} {dtype}: {tally.examples} cases in {seconds:.1f} s, "
            f"{closest} — {verdict}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        print(MISSING_HYPOTHESIS, file=sys.stderr)
        return 2
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    todo = cells(args.loss, devices, args.dtype)
    seed = args.seed if args.seed is not None else (random.randrange(2**31) if args.long else 0)
    examples = LONG_EXAMPLES if args.long else args.examples
    budget = f"{args.minutes:g} minutes in all" if args.minutes else f"{examples or 100} cases each"
    print(f"kdloss.fuzz: {len(todo)} cells, {budget}, seed {seed}", flush=True)
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else None
    tallies = []
    for index, (loss, device, dtype) in enumerate(todo, 1):
        minutes = None
        if deadline is not None:  # what is left, shared by the cells still to run
            minutes = max(deadline - time.monotonic(), 0.0) / 60 / (len(todo) - index + 1)
        start = time.monotonic()
        tally = fuzz(loss, device, dtype, examples=examples, minutes=minutes, seed=seed)
        tallies.append(tally)
        print(progress_line(index, len(todo), tally, time.monotonic() - start), flush=True)
        if not tally.passed:
            print(f"\n{loss} on {device} {dtype}: {tally.failure or tally.errors[0]}\n"
                  f"minimal reproducer:\n{tally.reproducer}", flush=True)
    print(format_table(tallies))
    return 0 if all(t.passed for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
