"""Benchmark harness shared by every loss: forward+backward time and peak extra memory of each
implementation (kdloss kernel, eager reference, torch.compile, peers) at realistic shapes.

Each loss has a module ``kdloss.bench.<loss>`` exposing ``cases(device, dtypes, quick)`` → list of
:class:`Case`. Run ``python -m kdloss.bench`` (all losses) or ``benchmarks/bench_<loss>.py``.
Every case reports the minimum, the median and the spread (interquartile range over the median) of
``repeat`` timed steps after warm-up; CUDA timings use events after a sync. A warning is printed
when the spread or the machine's load says the numbers are not to be trusted. Peak memory is the
high-water mark of allocations made during one forward+backward (CUDA: the caching allocator's
peak; CPU: torch.profiler's allocation trace), inputs excluded. Results go to a user cache directory
(``$KDLOSS_BENCH_DIR``, else ``$XDG_CACHE_HOME/kdloss/bench``) or ``--out``: ``results.csv``,
``machine.json`` and, with matplotlib, one PNG plot per loss.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import _registry

# torch.compile's worker pool (one subprocess per core, started with the first compiled function)
# competes for the cores while the other backends are timed: on the 2-core VM the top-k kernel timed
# 46 ms instead of 23 ms with THP on. Compile time is not what these benchmarks measure; a value the
# user set is kept.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

#: loss name → module defining its cases
LOSSES = {name: f"kdloss.bench.{name}"
          for name in _registry.names() if _registry.get(name).bench}

CSV_FIELDS = ["loss", "case", "shape", "dtype", "backend", "device", "elements", "min_ms", "median_ms", "spread",
              "peak_mib", "peak_rss_mib", "speedup_vs_eager", "threads", "load", "torch", "machine", "date"]

#: spread (interquartile range / median) above which a case's times are flagged as noisy
NOISY_SPREAD = 0.10
#: load average beyond our own threads, as a fraction of the cores, above which the machine is busy
BUSY_LOAD = 0.25


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


@dataclass
class Timing:
    """Times of ``repeat`` steps (ms): minimum, median and spread (interquartile range / median)."""

    min_ms: float
    median_ms: float
    spread: float


def summarize(samples: list[float]) -> Timing:
    ordered = sorted(samples)
    median = statistics.median(ordered)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1, q3 = ordered[0], ordered[-1]
    return Timing(ordered[0], median, (q3 - q1) / median if median > 0 else 0.0)


def time_step(fn, inputs, device: str, repeat: int, warmup: int = 3) -> Timing:
    """Times ``repeat`` forward+backward steps after ``warmup`` untimed ones."""
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
    return summarize(samples)


def time_ms(fn, inputs, device: str, repeat: int, warmup: int = 3) -> float:
    """Median ms of ``repeat`` forward+backward steps (see :func:`time_step`)."""
    return time_step(fn, inputs, device, repeat, warmup).median_ms


@contextlib.contextmanager
def _stderr_silenced():
    """Points file descriptor 2 at /dev/null: the profiler's C++ side prints ``USDT: ...
    profiler_start/stop`` lines there that no Python setting turns off."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_mib(fn, inputs, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(fn, inputs)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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
    Unlike :func:`peak_mib` it also sees memory an op allocates and frees internally. The kernels' idle
    gradient blocks are freed before the measured step (:func:`kdloss.empty_cache`), so that the blocks
    it uses count as extra memory even though a training loop would find them resident. Linux only."""
    from .. import empty_cache

    for _ in range(2):
        _step(fn, inputs)
    empty_cache()
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
    torch.set_num_threads(case_id.get("threads", torch.get_num_threads()))
    found = collect([case_id["loss_group"]], "cpu", [getattr(torch, case_id["dtype"])], case_id["quick"])
    case = found[case_id["index"]]
    print(step_peak_rss_mib(case.impls[case_id["backend"]], case.make_inputs()))
    return 0


def machine_load() -> float:
    """One-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def busy_warning(load: float, threads: int, cores: int) -> str | None:
    """A warning when more is running here than this benchmark's own threads."""
    others = load - threads
    if others > BUSY_LOAD * cores:
        return (f"the machine is busy (load average {load:.1f} on {cores} cores, this run uses {threads} "
                "threads): times are inflated and noisy; rerun on an idle machine before trusting them")
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} {os.cpu_count()} cores {torch.backends.cpu.get_cpu_capability()}"


def _elements(inputs) -> int:
    return sum(x.numel() for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad)


def run_case(case: Case, repeat: int, rss_id: dict | None = None) -> list[dict]:
    """Times every implementation of one case; ``rss_id`` (CPU only) also measures each one's peak
    extra RSS in a fresh subprocess."""
    rows = []
    date = time.strftime("%Y-%m-%d %H:%M")
    for backend, fn in case.impls.items():
        inputs = case.make_inputs()
        try:
            timing = time_step(fn, inputs, case.device, repeat)
            mib = peak_mib(fn, inputs, case.device)
            rss = _rss_in_subprocess({**rss_id, "backend": backend}) if rss_id else float("nan")
        except Exception as exc:  # a peer or torch.compile failing is a result, not a crash
            print(f"  {case.name} {backend}: failed ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        rows.append({"loss": case.loss, "case": case.name, "shape": case.shape,
                     "dtype": str(case.dtype).replace("torch.", ""), "backend": backend,
                     "device": case.device, "elements": _elements(inputs), "min_ms": timing.min_ms,
                     "median_ms": timing.median_ms, "spread": timing.spread, "peak_mib": mib,
                     "peak_rss_mib": rss, "load": machine_load(), "date": date})
    eager = next((r["median_ms"] for r in rows if r["backend"] == "eager"), None)
    for row in rows:
        row["speedup_vs_eager"] = eager / row["median_ms"] if eager else float("nan")
        row["threads"] = torch.get_num_threads()
        row["torch"] = torch.__version__
        row["machine"] = machine_name(case.device)
    return rows


def case_warnings(rows: list[dict]) -> list[str]:
    """Warnings about rows whose times are too noisy to compare."""
    return [f"{r['loss']} {r['case']} {r['shape']} {r['dtype']} {r['backend']}: spread {100 * r['spread']:.0f} % of "
            f"the median (min {r['min_ms']:.4g} ms, median {r['median_ms']:.4g} ms) — noisy, do not compare"
            for r in rows if r["spread"] > NOISY_SPREAD]


def _fmt_rss(value: float) -> str:
    return "—" if value != value else f"{value:.1f}"


def format_table(rows: list[dict]) -> str:
    header = ("| loss | case | shape | dtype | device | backend | min ms | median ms | spread | × eager | peak MiB | "
              "peak RSS MiB |")
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        flag = " (!)" if r["spread"] > NOISY_SPREAD else ""
        lines.append(f"| {r['loss']} | {r['case']} | {r['shape']} | {r['dtype']} | {r['device']} | "
                     f"{r['backend']} | {r['min_ms']:.4f} | {r['median_ms']:.4f} | {100 * r['spread']:.0f} %{flag} | "
                     f"{r['speedup_vs_eager']:.2f} | {r['peak_mib']:.2f} | {_fmt_rss(r['peak_rss_mib'])} |")
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


def read_csv(path: Path) -> list[dict]:
    """Rows of a results CSV with the numeric columns as numbers."""
    numeric = {"elements", "min_ms", "median_ms", "spread", "peak_mib", "peak_rss_mib", "speedup_vs_eager",
               "threads", "load"}
    with path.open() as fh:
        return [{k: (float(v) if k in numeric and v not in ("", None) else v) for k, v in row.items()}
                for row in csv.DictReader(fh)]


def default_out_dir() -> Path:
    """Where results go without ``--out``: ``$KDLOSS_BENCH_DIR``, else ``$XDG_CACHE_HOME/kdloss/bench``
    (``~/.cache/kdloss/bench``) — never the working directory."""
    env = os.environ.get("KDLOSS_BENCH_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "kdloss" / "bench"


def _command_line(argv: list[str]) -> str:
    """The arguments as a shell line, the ``--note`` text (stored on its own) elided."""
    import shlex

    shown, skip = [], False
    for arg in argv:
        if skip:
            shown.append("...")
            skip = False
            continue
        skip = arg == "--note"
        shown.append(arg.split("=", 1)[0] + "=..." if arg.startswith("--note=") else arg)
    return shlex.join(shown).replace("'...'", "...")


def write_machine(out: Path, device: str, loads: tuple[float, float], argv: list[str], note: str) -> None:
    """``machine.json``: what the results were measured on and under which conditions."""
    info = {"device": machine_name(device), "cpu": cpu_model(), "cores": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_before": round(loads[0], 2), "load_after": round(loads[1], 2),
            "date": time.strftime("%Y-%m-%d"), "command": "python -m kdloss.bench " + _command_line(argv),
            "note": note}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    (out / "machine.json").write_text(json.dumps(info, indent=1) + "\n")


def collect(losses: list[str], device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    cases = []
    for loss in losses:
        module = importlib.import_module(LOSSES[loss])
        cases += module.cases(device, dtypes, quick)
    return cases


QUICK_NOTE = ("--quick shapes are tiny: times are dominated by per-call Python and dispatch overhead "
              "(~0.05 ms per custom op with autograd), not by the kernels, so kdloss can look slower than "
              "eager there; compare speed at the default shapes")


def _warn(message: str) -> None:
    print(f"kdloss.bench: warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m kdloss.bench", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", action="append", choices=sorted(LOSSES), help="default: all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"],
                        help="default: float32 and bfloat16")
    parser.add_argument("--repeat", type=int, default=20, help="timed steps per implementation (default 20)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the run (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke run; overhead-bound)")
    parser.add_argument("--out", type=Path, help="results directory (default: $KDLOSS_BENCH_DIR or "
                                                 "$XDG_CACHE_HOME/kdloss/bench)")
    parser.add_argument("--note", default="", help="free text stored in machine.json (conditions of the run)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plots")
    parser.add_argument("--rss", action="store_true",
                        help="CPU: also measure each implementation's peak extra RSS in a fresh process "
                             "(sees memory freed inside ops, which the profiler-based 'peak MiB' misses)")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        return _rss_child(json.loads(args.rss_child))
    out = args.out or default_out_dir()
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float32", "bfloat16"])]
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    load_before = machine_load()
    if args.device == "cpu" and (busy := busy_warning(load_before, 0, cores)):
        _warn(busy)
    if args.quick:
        _warn(QUICK_NOTE)
    rows = []
    for loss in args.loss or sorted(LOSSES):
        for dtype in dtypes:
            for index, case in enumerate(collect([loss], args.device, [dtype], args.quick)):
                rss_id = None
                if args.rss and args.device == "cpu":
                    rss_id = {"loss_group": loss, "dtype": str(dtype).replace("torch.", ""), "quick": args.quick,
                              "index": index, "threads": threads}
                rows += run_case(case, args.repeat, rss_id)
    print(format_table(rows))
    load_after = machine_load()
    for message in case_warnings(rows):
        _warn(message)
    if args.device == "cpu" and (busy := busy_warning(load_after, threads, cores)):
        _warn(busy)
    out.mkdir(parents=True, exist_ok=True)
    append_csv(rows, out / "results.csv")
    write_machine(out, args.device, (load_before, load_after), argv, args.note)
    print(f"\nappended {len(rows)} rows to {out / 'results.csv'}")
    if not args.no_plot:
        from .plot import plot_losses

        for path in plot_losses(rows, out):
            print(f"wrote {path}")
    return 0
