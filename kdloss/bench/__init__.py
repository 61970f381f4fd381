"""Benchmark harness shared by every loss: forward+backward time and peak extra memory of each
implementation (kdloss kernel, eager reference, torch.compile, peers) at realistic shapes.

Each loss has a module ``kdloss.bench.<loss>`` exposing ``cases(device, dtypes, quick)`` → list of
:class:`Case`. Run ``python -m kdloss.bench`` (all losses) or ``benchmarks/bench_<loss>.py``.
Timings are medians over ``repeat`` runs after warm-up; CUDA timings use events after a sync.
Peak memory is the high-water mark of allocations made during one forward+backward (CUDA: the
caching allocator's peak; CPU: torch.profiler's allocation trace), inputs excluded.
"""

from __future__ import annotations

import csv
import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import _registry

#: loss name → module defining its cases
LOSSES = {name: f"kdloss.bench.{name}"
          for name in _registry.names() if _registry.get(name).bench}

CSV_FIELDS = ["loss", "case", "shape", "dtype", "backend", "device", "median_ms", "peak_mib",
              "peak_rss_mib", "speedup_vs_eager", "threads", "torch", "machine"]


@dataclass
class Case:
    """One benchmark: inputs (made fresh, leaf tensors requiring grad) and the implementations."""

    loss: str
    name: str
    shape: str
    dtype: torch.dtype
    device: str
    make_inputs: Callable[[], tuple]
    impls: dict[str, Callable[..., torch.Tensor]] = field(default_factory=dict)


def fuzz_case_inputs(build: Callable, case: dict, device: str, dtype: torch.dtype,
                     constants: tuple[str, ...] = ("teacher",)) -> Callable[[], tuple]:
    """``make_inputs`` for a :class:`Case` from a fuzz spec's ``build(case, device, dtype)``: the
    built differentiable inputs followed by the named constants, freshly made on every call."""

    def make():
        built = build(case, torch.device(device), dtype)
        return (*built.inputs, *(built.constants[name] for name in constants))

    return make


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(fn, inputs) -> None:
    out = fn(*inputs)
    grads_of = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    torch.autograd.grad(out, grads_of)


def time_ms(fn, inputs, device: str, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        _step(fn, inputs)
    _sync(device)
    samples = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _step(fn, inputs)
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            _step(fn, inputs)
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_mib(fn, inputs, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(fn, inputs)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(fn, inputs)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def step_peak_rss_mib(fn, inputs) -> float:
    """Peak extra resident memory (MiB) of one CPU step, inputs excluded: two warm-up steps, then
    the kernel's high-water mark is reset (``/proc/self/clear_refs``) and one step is measured.
    Unlike :func:`peak_mib` it also sees memory an op allocates and frees internally. Linux only."""
    for _ in range(2):
        _step(fn, inputs)
    base = _rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    _step(fn, inputs)
    return max(0.0, _rss_mib("VmHWM") - base)


def _rss_in_subprocess(case_id: dict) -> float:
    """:func:`step_peak_rss_mib` of one (case, backend) in a fresh interpreter (``case_id`` as
    built by :func:`run_case`), so that earlier cases' memory does not hide its peak."""
    import json
    import subprocess
    import sys

    # A fixed mmap threshold: glibc otherwise raises it after large frees and keeps later large
    # blocks on the heap, already resident from the warm-up, which would hide them from VmHWM.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-m", "kdloss.bench", "--rss-child", json.dumps(case_id)],
                            capture_output=True, text=True, timeout=1800, env=env)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-500:])
    return float(result.stdout.strip().splitlines()[-1])


def _rss_child(case_id: dict) -> int:
    found = collect([case_id["loss_group"]], "cpu", [getattr(torch, case_id["dtype"])], case_id["quick"])
    case = found[case_id["index"]]
    print(step_peak_rss_mib(case.impls[case_id["backend"]], case.make_inputs()))
    return 0


def run_case(case: Case, repeat: int, rss_id: dict | None = None) -> list[dict]:
    """Times every implementation of one case; ``rss_id`` (CPU only) also measures each one's peak
    extra RSS in a fresh subprocess."""
    rows = []
    for backend, fn in case.impls.items():
        inputs = case.make_inputs()
        try:
            ms = time_ms(fn, inputs, case.device, repeat)
            mib = peak_mib(fn, inputs, case.device)
            rss = _rss_in_subprocess({**rss_id, "backend": backend}) if rss_id else float("nan")
        except Exception as exc:  # a peer or torch.compile failing is a result, not a crash
            print(f"  {case.name} {backend}: failed ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        rows.append({"loss": case.loss, "case": case.name, "shape": case.shape,
                     "dtype": str(case.dtype).replace("torch.", ""), "backend": backend,
                     "device": case.device, "median_ms": ms, "peak_mib": mib, "peak_rss_mib": rss})
    eager = next((r["median_ms"] for r in rows if r["backend"] == "eager"), None)
    for row in rows:
        row["speedup_vs_eager"] = eager / row["median_ms"] if eager else float("nan")
        row["threads"] = torch.get_num_threads()
        row["torch"] = torch.__version__
        row["machine"] = (torch.cuda.get_device_name() if case.device == "cuda"
                          else f"{platform.machine()} {os.cpu_count()} cores {torch.backends.cpu.get_cpu_capability()}")
    return rows


def format_table(rows: list[dict]) -> str:
    header = "| loss | case | shape | dtype | device | backend | median ms | × eager | peak MiB | peak RSS MiB |"
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        rss = "—" if r["peak_rss_mib"] != r["peak_rss_mib"] else f"{r['peak_rss_mib']:.1f}"
        lines.append(f"| {r['loss']} | {r['case']} | {r['shape']} | {r['dtype']} | {r['device']} | "
                     f"{r['backend']} | {r['median_ms']:.4f} | {r['speedup_vs_eager']:.2f} | {r['peak_mib']:.2f} | "
                     f"{rss} |")
    return "\n".join(lines)


def append_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with path.open() as fh:
            if fh.readline().strip() != ",".join(CSV_FIELDS):  # written by an older harness
                path.rename(path.with_suffix(".old.csv"))
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def collect(losses: list[str], device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    cases = []
    for loss in losses:
        module = importlib.import_module(LOSSES[loss])
        cases += module.cases(device, dtypes, quick)
    return cases


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kdloss.bench", description="kdloss benchmarks")
    parser.add_argument("--loss", action="append", choices=sorted(LOSSES), help="default: all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"],
                        help="default: float32 and bfloat16")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke run)")
    parser.add_argument("--csv", type=Path, default=Path("benchmarks/results/results.csv"))
    parser.add_argument("--rss", action="store_true",
                        help="CPU: also measure each implementation's peak extra RSS in a fresh process "
                             "(sees memory freed inside ops, which the profiler-based 'peak MiB' misses)")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        import json

        return _rss_child(json.loads(args.rss_child))
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float32", "bfloat16"])]
    rows = []
    for loss in args.loss or sorted(LOSSES):
        for dtype in dtypes:
            for index, case in enumerate(collect([loss], args.device, [dtype], args.quick)):
                rss_id = None
                if args.rss and args.device == "cpu":
                    rss_id = {"loss_group": loss, "dtype": str(dtype).replace("torch.", ""), "quick": args.quick,
                              "index": index}
                rows += run_case(case, args.repeat, rss_id)
    print(format_table(rows))
    append_csv(rows, args.csv)
    print(f"\nappended {len(rows)} rows to {args.csv}")
    return 0
