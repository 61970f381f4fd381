"""Parity fuzzer: ``python -m kdloss.fuzz`` checks every kernel against the fp64 reference on the
hardware it runs on, for as long as asked, and prints a verdict table.

    python -m kdloss.fuzz [--loss NAME] [--device cpu|cuda] [--dtype float32 ...]
                          [--minutes M | --examples N] [--seed S]

Inputs come from the generators each loss registers in ``kdloss.testing`` (hypothesis strategies
covering each loss's hard corners). A failing case is shrunk by hypothesis to a minimal one and
printed as a ready-to-paste Python snippet. Exit code 1 on any failure. The error rule is
documented in ``docs/verifying.md``.
"""

from __future__ import annotations

import argparse
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
         minutes: float | None = None, seed: int = 0, chunk: int = 50) -> Tally:
    """Runs one (loss, device, dtype) until ``examples`` cases ran or ``minutes`` elapsed."""
    spec = testing.get(loss)
    tally = Tally(loss, device, dtype)
    deadline = time.monotonic() + 60 * minutes if minutes else None
    remaining = examples if examples is not None else (None if minutes else 100)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdloss.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--loss", action="append", choices=testing.names(), help="default: every loss")
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="default: cpu, and cuda when a GPU is visible")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="default: every dtype")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="time budget per (loss, device, dtype)")
    budget.add_argument("--examples", type=int, help="cases per (loss, device, dtype); default 100")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    tallies = []
    for loss in args.loss or testing.names():
        spec = testing.get(loss)
        for device in devices:
            for dtype in [DTYPES[d] for d in args.dtype] if args.dtype else spec.dtypes:
                tally = fuzz(loss, device, dtype, examples=args.examples, minutes=args.minutes, seed=args.seed)
                tallies.append(tally)
                if not tally.passed:
                    print(f"\n{loss} on {device} {dtype}: "
                          f"{tally.failure or tally.errors[0]}\nminimal reproducer:\n{tally.reproducer}")
    print(format_table(tallies))
    return 0 if all(t.passed for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
