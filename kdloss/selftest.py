"""Checks every kdloss kernel on the machine it runs on, in one command, and writes one summary.

    python -m kdloss.selftest --device cuda --out DIR       # one GPU, 16 cores: under 8 minutes
    python -m kdloss.selftest --device cpu --quick --out DIR  # the same pipeline on the CPU (CI)

Stages, in this order, each in its own subprocess with its own time budget, so that a failure, a hang
or a CUDA error in one stage cannot stop or poison the next:

* ``build`` — every kernel (CPU, and CUDA for ``--device cuda``) compiled in parallel, one fresh
  interpreter per kernel, sharing ``$MAX_JOBS`` compiler jobs (default: every core);
* ``tests`` — pytest: every test marked ``cuda`` (``--device cpu``: ``tests/test_cuda.py`` pointed at
  the CPU through ``$KDLOSS_TEST_DEVICE``);
* ``fuzz`` — the parity fuzzer (:mod:`kdloss.fuzz`) for every loss and dtype on the device, sharing
  the stage's budget;
* ``sanitizer`` — ``compute-sanitizer`` memcheck and racecheck over a probe of small cases in every
  input layout (CUDA only; skipped with the reason when the toolkit has no sanitizer);
* ``bench`` — the performance goals of :mod:`kdloss.bench.goals`, kdloss against eager code,
  torch.compile and Liger-Kernel where it applies (when installed), with each goal next to its
  measurement.

Without a GPU, ``--device cuda`` skips every stage that needs one and says why (the build stage
still compiles the CUDA kernels when a CUDA build of torch and nvcc exist). The output folder gets
``summary.json``, ``summary.md`` and ``selftest.log`` (every stage's full output). The exit code is
0 when every stage that ran passed, 1 otherwise.

Options: ``--quick`` (small budgets and shapes), ``--stage NAME`` and ``--loss NAME`` (repeatable:
run a subset, e.g. to re-check a fix), ``--budget STAGE=SECONDS`` (repeatable) and ``--total
SECONDS`` (the whole run; a stage gets at most what is left).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import _build, _registry

STAGES = ("build", "tests", "fuzz", "sanitizer", "bench")

#: seconds per stage, by (device, quick); a stage also never outlives the --total budget
BUDGETS = {
    ("cuda", False): {"build": 150, "tests": 150, "fuzz": 40, "sanitizer": 75, "bench": 100},
    ("cuda", True): {"build": 150, "tests": 60, "fuzz": 15, "sanitizer": 40, "bench": 40},
    ("cpu", False): {"build": 600, "tests": 900, "fuzz": 120, "sanitizer": 60, "bench": 300},
    ("cpu", True): {"build": 300, "tests": 120, "fuzz": 40, "sanitizer": 40, "bench": 90},
}
TOTALS = {("cuda", False): 465, ("cuda", True): 300, ("cpu", False): 2400, ("cpu", True): 600}
GRACE_S = 15  # a worker that overruns its budget by this much is killed
MIN_STAGE_S = 5
QUICK_FUZZ_EXAMPLES = 3

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = PACKAGE_ROOT / "tests"


@dataclass
class StageResult:
    """Outcome of one stage: ``status`` is "pass", "fail" or "skip"; ``reason`` says why in one line."""

    name: str
    status: str
    reason: str
    seconds: float = 0.0
    budget_s: float = 0.0
    details: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# the machine


def cuda_unavailable_reason() -> str | None:
    """Why CUDA kernels cannot run here (None when a CUDA device is usable)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return f"no CUDA device visible (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return None


def environment() -> dict:
    """The facts a reader of the summary needs to place the numbers."""
    gpus = []
    if cuda_unavailable_reason() is None:
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    from . import __version__

    return {
        "kdloss": __version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "gpus": gpus,
        "cuda_toolkit": _build.cuda_toolkit(), "compute_sanitizer": find_compute_sanitizer(),
        "max_jobs": max_jobs(),
    }


def max_jobs() -> int:
    """Compiler jobs in all: $MAX_JOBS, else every core."""
    try:
        return max(1, int(os.environ["MAX_JOBS"]))
    except (KeyError, ValueError):
        return os.cpu_count() or 1


def find_compute_sanitizer() -> str | None:
    """Path of ``compute-sanitizer``: on PATH, else in the CUDA toolkit (both of its usual places)."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = [r for r in (_build.cuda_toolkit(), os.environ.get("CUDA_HOME"), "/usr/local/cuda") if r]
    for root in roots:
        for rel in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
            path = Path(root) / rel
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return None


def fuzz_losses(selected: list[str] | None) -> list[str]:
    """Losses with a fuzz spec (every registry entry with a kernel path), restricted to ``selected``."""
    from . import testing

    return [n for n in testing.names() if not selected or n in selected]


def kernel_names(selected: list[str] | None) -> list[str]:
    """Kernel libraries to build (kdloss._registry): all, or those the selected losses run on."""
    names = _registry.kernel_libraries()
    if not selected:
        return names
    wanted = {kernel for loss in selected for kernel in _registry.get(loss).kernels}
    return [n for n in names if n in wanted]


# --------------------------------------------------------------------------------------------
# workers (run in a subprocess: python -m kdloss.selftest --worker STAGE ...)


class Reporter:
    """Writes a worker's result file after every step, so a killed worker still leaves its partial result."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, status: str, reason: str, details: dict, final: bool = False) -> None:
        with self.lock:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as fh:
                json.dump({"status": status, "reason": reason, "details": details, "final": final}, fh,
                          default=_json_default)
            os.replace(tmp, self.path)


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _last_line(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = " | ".join(lines[-3:]) if lines else type(exc).__name__
    return tail[-limit:]


BUILD_MARK = "KDLOSS-BUILD "
BUILD_SOME = f"""
import json, sys, time
from kdloss import _build
for name, device in zip(sys.argv[1::2], sys.argv[2::2]):
    start = time.perf_counter()
    try:
        _build.build(name, device)
        row = {{"kernel": name, "device": device, "status": "pass"}}
    except Exception as exc:
        row = {{"kernel": name, "device": device, "status": "fail", "error": f"{{type(exc).__name__}}: {{exc}}"}}
    row["seconds"] = time.perf_counter() - start
    print("{BUILD_MARK}" + json.dumps(row), flush=True)
"""


def _build_group(jobs: list[tuple[str, str]], env: dict, on_row) -> None:
    """Builds (or finds cached) ``jobs`` one after the other in one fresh interpreter (no build state
    is shared with the other groups, which run in parallel); ``on_row(row, output)`` per kernel."""
    args = [item for job in jobs for item in job]
    proc = subprocess.Popen([sys.executable, "-c", BUILD_SOME, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    done = set()
    for line in proc.stdout:
        if line.startswith(BUILD_MARK):
            row = json.loads(line[len(BUILD_MARK):])
            done.add((row["kernel"], row["device"]))
            on_row(row, "".join(output))
            output = []
        else:
            output.append(line)
    proc.wait()
    for name, device in jobs:  # the interpreter died before reporting these
        if (name, device) not in done:
            on_row({"kernel": name, "device": device, "status": "fail", "seconds": 0.0,
                    "error": f"build process exited with code {proc.returncode}"}, "".join(output))


def _error_summary(row: dict, output: str) -> str:
    lines = [ln.strip() for ln in (output + "\n" + row.get("error", "")).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"\berror\b|Error", ln)]
    return " | ".join(errors[:3] if errors else lines[-3:])[-1500:]


def worker_build(opts, deadline: float, report: Reporter) -> int:
    """Compiles every kernel in parallel: the (kernel, device) jobs are dealt round-robin to as many
    interpreters as ``$MAX_JOBS`` allows at two compiler jobs each; one row per kernel."""
    devices = ["cuda", "cpu"] if opts.device == "cuda" else ["cpu"]
    jobs = [(name, device) for device in devices for name in kernel_names(opts.loss)]  # CUDA first: slowest
    total = max_jobs()
    workers = max(1, min(len(jobs), total // 2 or 1))
    env = {**os.environ, "MAX_JOBS": str(max(1, total // workers)), "PYTHONUNBUFFERED": "1"}
    if "cuda" in devices:
        env.setdefault("TORCH_CUDA_ARCH_LIST", _build.cuda_arch_list())
    rows: list[dict] = []
    details = {"kernels": rows, "max_jobs": total, "parallel_builds": workers, "jobs_per_build": int(env["MAX_JOBS"]),
               "arch_list": env.get("TORCH_CUDA_ARCH_LIST")}
    rows_lock = threading.Lock()

    def on_row(row: dict, output: str) -> None:
        if row["status"] != "pass":
            row["error"] = _error_summary(row, output)
        with rows_lock:
            print(f"--- {row['kernel']} {row['device']}: {row['status']} in {row['seconds']:.1f} s\n{output}",
                  flush=True)
            rows.append(row)
            report("fail", f"{len(rows)} of {len(jobs)} built so far", details)

    groups = [jobs[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda group: _build_group(group, env, on_row), groups))
    failed = [r for r in rows if r["status"] != "pass"]
    counts = Counter(r["device"] for r in rows if r["status"] == "pass")
    built = ", ".join(f"{n} {d}" for d, n in sorted(counts.items()))
    if failed:
        reason = f"{len(failed)} of {len(rows)} kernels failed to build: " + "; ".join(
            f"{r['kernel']}/{r['device']}: {r['error'][-200:]}" for r in failed[:3])
    else:
        reason = f"{len(rows)} kernels built ({built}) in {workers} parallel processes x {env['MAX_JOBS']} jobs"
    report("fail" if failed else "pass", reason, details, final=True)
    return 1 if failed else 0


def worker_fuzz(opts, deadline: float, report: Reporter) -> int:
    """The parity fuzzer per (loss, dtype), splitting what is left of the budget evenly."""
    from . import fuzz, testing

    pairs = [(loss, dtype) for loss in fuzz_losses(opts.loss) for dtype in testing.get(loss).dtypes]
    rows: list[dict] = []
    details = {"runs": rows, "device": opts.device}
    for index, (loss, dtype) in enumerate(pairs):
        left = deadline - time.monotonic()
        if left < 1.0:
            rows.append({"loss": loss, "dtype": dtype, "verdict": "not run", "examples": 0})
            continue
        if opts.quick:
            tally = fuzz.fuzz(loss, opts.device, dtype, examples=QUICK_FUZZ_EXAMPLES, chunk=QUICK_FUZZ_EXAMPLES)
        else:
            share = left / (len(pairs) - index)
            tally = fuzz.fuzz(loss, opts.device, dtype, minutes=share / 60.0, chunk=5)
        rows.append(_tally_row(tally))
        report("fail", f"{len(rows)} of {len(pairs)} runs so far", details)
    failed = [r for r in rows if r["verdict"] in ("FAIL", "ERROR")]
    not_run = [r for r in rows if r["verdict"] == "not run"]
    examples = sum(r["examples"] for r in rows)
    reason = f"{examples} cases over {len(rows) - len(not_run)} (loss, dtype) runs"
    if not_run:
        reason += f"; {len(not_run)} runs not started (budget spent)"
    if failed:
        reason = f"{len(failed)} of {len(rows)} runs failed: " + ", ".join(
            f"{r['loss']}/{r['dtype']}" for r in failed[:6]) + f" ({reason})"
    report("fail" if failed else "pass", reason, details, final=True)
    return 1 if failed else 0


def _tally_row(tally) -> dict:
    worst = tally.failure or tally.worst
    verdict = "PASS" if tally.passed else ("FAIL" if tally.failure else "ERROR")
    return {
        "loss": tally.loss, "dtype": tally.dtype, "examples": tally.examples, "verdict": verdict,
        "worst_error": worst.error if worst else None, "bound": worst.bound if worst else None,
        "what": worst.what if worst else None, "errors": tally.errors[:3], "case": tally.case,
        "reproducer": tally.reproducer,
    }


def probe_plan(opts) -> list[tuple[str, str, torch.dtype, str]]:
    """(loss, case, dtype, layout) for the sanitizer probe: under memcheck the small case in every
    layout and dtype plus every larger case once; under racecheck (slower) each case once in fp32."""
    from .testing.device import CASES, LAYOUTS

    plan = []
    for loss in fuzz_losses(opts.loss):
        cases = CASES.get(loss, {})
        if opts.quick:
            plan += [(loss, "small", torch.float32, layout) for layout in ("contiguous", "misaligned")
                     if "small" in cases]
        elif opts.tool == "racecheck":
            plan += [(loss, name, torch.float32, "contiguous") for name in cases]
        else:
            plan += [(loss, "small", dtype, layout) for dtype in (torch.float32, torch.bfloat16)
                     for layout in LAYOUTS if "small" in cases]
            plan += [(loss, name, torch.bfloat16, "misaligned") for name in cases if name != "small"]
    return plan


def worker_probe(opts, deadline: float, report: Reporter) -> int:
    """Runs forward + backward of the probe cases (the program compute-sanitizer watches)."""
    from .testing.device import CASES, run_case

    plan = probe_plan(opts)
    rows: list[dict] = []
    details = {"cases": rows, "tool": opts.tool, "planned": len(plan)}
    for loss, name, dtype, layout in plan:
        if time.monotonic() > deadline:
            break
        start = time.perf_counter()
        row = {"loss": loss, "case": name, "dtype": dtype, "layout": layout}
        try:
            run_case(loss, CASES[loss][name], opts.device, dtype, layout)
            if opts.device == "cuda":
                torch.cuda.synchronize()
            row["status"] = "pass"
        except Exception as exc:
            row.update(status="fail", error=_last_line(exc))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        report("fail", f"{len(rows)} of {len(plan)} probe cases so far", details)
        if row["status"] == "fail" and "CUDA" in row.get("error", ""):
            break  # a CUDA error is sticky: every later launch in this process would fail too
    failed = [r for r in rows if r["status"] != "pass"]
    reason = f"ran {len(rows)} of {len(plan)} probe cases"
    if failed:
        reason = f"{len(failed)} probe cases raised: " + "; ".join(
            f"{r['loss']}/{r['case']}/{r['layout']}: {r['error'][-160:]}" for r in failed[:3])
    report("fail" if failed else "pass", reason, details, final=True)
    return 1 if failed else 0


# bench ---------------------------------------------------------------------------------------

BENCH_PASSES = (("kdloss",), ("kdloss-unfused", "eager"), ("liger-fljsd",), ("compile",))
COMPILE_MIN_LEFT_S = 40.0


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _grad_mib(inputs) -> float:
    return sum(x.numel() * x.element_size() for x in inputs
               if isinstance(x, torch.Tensor) and x.requires_grad) / 2**20


def kernel_ms(fn, inputs, steps: int = 3) -> float:
    """GPU busy time of one step: the summed durations of its kernels and copies (torch.profiler),
    free of the host-side launch gaps that per-step event timing includes for microsecond workloads."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from .bench import _step

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            _step(fn, inputs)
        torch.cuda.synchronize()
    total_us = sum(e.time_range.elapsed_us() for e in prof.events()
                   if getattr(e, "device_type", None) == DeviceType.CUDA)
    if total_us <= 0:  # no CUPTI here: never report 0 ms as a measurement
        raise RuntimeError("the profiler recorded no GPU activity")
    return total_us / steps / 1e3


def measure(fn, inputs, device: str, quick: bool) -> dict:
    """Median time of a forward + backward step, GPU busy time (CUDA), peak extra memory."""
    from .bench import _step, peak_mib, time_ms

    start = time.perf_counter()
    _step(fn, inputs)  # the first call: compiles torch.compile code, loads kernels
    _sync(device)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    _step(fn, inputs)
    _sync(device)
    step_s = max(time.perf_counter() - start, 1e-5)
    repeat = 3 if quick else int(min(50, max(5, 0.5 / step_s)))
    row = {"first_call_s": first_s, "repeat": repeat, "median_ms": time_ms(fn, inputs, device, repeat, warmup=1)}
    row["peak_mib"] = peak_mib(fn, inputs, device)
    row["grad_mib"] = _grad_mib(inputs)
    row["extra_mib"] = row["peak_mib"] - row["grad_mib"]
    row["gpu_ms"] = float("nan")
    if device == "cuda":
        try:
            row["gpu_ms"] = kernel_ms(fn, inputs)
        except Exception as exc:  # the profiler is optional
            row["gpu_ms_error"] = _last_line(exc)
    return row


def judge_goal(goal, row: dict, device: str, device_name: str, quick: bool) -> None:
    """Sets ``row["verdict"]`` (and the numbers it was judged on) for one goal's kdloss result."""
    kd = row["results"].get("kdloss")
    if device != "cuda" or quick:
        row["verdict"] = "n/a (goals are for an H100/H200 at the full shape)"
        return
    if kd is None or "error" in kd:
        row["verdict"] = "error" if kd else "not measured"
        return
    gpu = kd.get("gpu_ms")
    judged = gpu if isinstance(gpu, float) and math.isfinite(gpu) else kd["median_ms"]
    row["judged_ms"] = judged
    misses = []
    if judged > row["goal_ms_here"]:
        misses.append(f"time {judged:.3f} ms > {row['goal_ms_here']:.3f} ms")
    limit = row.get("memory_limit_mib")
    if limit is not None and kd["extra_mib"] > limit:
        misses.append(f"memory {kd['extra_mib']:.0f} MiB > {limit:.0f} MiB")
    row["verdict"] = "met" if not misses else "missed: " + "; ".join(misses)


def worker_bench(opts, deadline: float, report: Reporter) -> int:
    """Every goal of kdloss.bench.goals: kdloss first for all, then eager, peers, torch.compile while
    the budget lasts."""
    from .bench.goals import GOALS

    device, quick = opts.device, opts.quick
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU"
    goals = [g for g in GOALS if not opts.loss or g.loss in opts.loss]
    rows = []
    for goal in goals:
        args = goal.quick_args if quick else goal.args
        rows.append({"loss": goal.loss, "workload": goal.workload, "shape": goal.shape(quick), "dtype": goal.dtype,
                     "goal_ms_h100": goal.time_ms, "goal_ms_here": goal.time_goal_ms(device_name),
                     "memory_bound": goal.memory_bound, "memory_goal": goal.memory,
                     "memory_limit_mib": goal.memory_limit_mib(args) if goal.memory_limit_mib else None,
                     "reference_h100": goal.reference, "results": {}})
    details = {"goals": rows, "device_name": device_name, "quick": quick}
    for names in BENCH_PASSES:
        for goal, row in zip(goals, rows, strict=True):
            _bench_pass(goal, row, names, device, quick, deadline)
            report("fail", "measuring", details)
    for goal, row in zip(goals, rows, strict=True):
        judge_goal(goal, row, device, device_name, quick)
    errors = [r for r in rows if "error" in r["results"].get("kdloss", {"error": "not measured"})]
    missed = [r for r in rows if r["verdict"].startswith("missed")]
    met = [r for r in rows if r["verdict"] == "met"]
    if errors:
        reason = f"kdloss failed or was not measured on {len(errors)} of {len(rows)} goals: " + ", ".join(
            f"{r['workload']} {r['shape']}" for r in errors[:4])
    elif device == "cuda" and not quick:
        reason = f"{len(met)} of {len(rows)} goals met" + (
            ": missed " + ", ".join(f"{r['workload']} {r['shape']}" for r in missed) if missed else "")
    else:
        reason = f"measured {len(rows)} workloads at {'quick' if quick else 'full'} shapes (goals not judged here)"
    status = "fail" if errors or missed else "pass"
    report(status, reason, details, final=True)
    return 1 if status == "fail" else 0


def _bench_pass(goal, row: dict, names: tuple[str, ...], device: str, quick: bool, deadline: float) -> None:
    if deadline - time.monotonic() < 2.0:
        for name in names:
            if name in ("kdloss", "eager"):
                row["results"].setdefault(name, {"skipped": "budget spent"})
        return
    try:
        inputs, impls = goal.make(device, quick)
    except Exception as exc:
        row["results"].setdefault("kdloss", {"error": f"making inputs: {_last_line(exc)}"})
        return
    if "liger-fljsd" in names and "liger-fljsd" in goal.peers and "liger-fljsd" not in impls:
        row["results"]["liger-fljsd"] = {"skipped": "Liger-Kernel not installed"}
    for name in names:
        if name not in impls:
            continue
        left = deadline - time.monotonic()
        if name == "compile" and quick:
            row["results"][name] = {"skipped": "--quick"}
            continue
        if left < (COMPILE_MIN_LEFT_S if name == "compile" else 2.0):
            row["results"][name] = {"skipped": f"budget spent ({left:.0f} s left)"}
            continue
        try:
            row["results"][name] = measure(impls[name], inputs, device, quick)
        except Exception as exc:  # a peer failing (or OOM) is a result, not a crash
            row["results"][name] = {"error": _last_line(exc)}
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    del inputs, impls
    if device == "cuda":
        torch.cuda.empty_cache()


WORKERS = {"build": worker_build, "fuzz": worker_fuzz, "probe": worker_probe, "bench": worker_bench}


def worker_main(opts) -> int:
    report = Reporter(opts.result)
    deadline = time.monotonic() + opts.seconds
    try:
        return WORKERS[opts.worker](opts, deadline, report)
    except Exception as exc:
        traceback.print_exc()
        report("fail", f"worker crashed: {_last_line(exc)}", {}, final=True)
        return 1


# --------------------------------------------------------------------------------------------
# the parent: stages as subprocesses


@dataclass
class Context:
    device: str
    quick: bool
    losses: list[str] | None
    log_path: Path
    tmp: Path
    python: str = sys.executable


def _child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_logged(cmd: list[str], title: str, ctx: Context, timeout: float, env: dict | None = None,
               cwd: Path | None = None) -> tuple[int | None, float, str]:
    """Runs ``cmd`` in its own process group with its output appended to the log; kills the whole
    group after ``timeout`` seconds. Returns (exit code or None if killed, seconds, output tail)."""
    out_path = ctx.tmp / f"{re.sub(r'[^A-Za-z0-9]+', '_', title)}.out"
    start = time.monotonic()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_child_env(env), cwd=cwd,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    seconds = time.monotonic() - start
    text = out_path.read_text(errors="replace")
    with open(ctx.log_path, "a") as log:
        log.write(f"\n===== {title} ({seconds:.1f} s, exit {rc if rc is not None else 'killed: timeout'}) =====\n")
        log.write("$ " + " ".join(cmd) + "\n")
        log.write(text)
    return rc, seconds, text[-4000:]


def run_worker(ctx: Context, worker: str, budget: float, extra_args: list[str] | None = None,
               wrapper: list[str] | None = None, env: dict | None = None, title: str | None = None,
               seconds_for_worker: float | None = None) -> tuple[dict | None, int | None, float, str]:
    """One worker subprocess; returns (its last reported result or None, exit code, seconds, tail)."""
    result_path = ctx.tmp / f"{title or worker}.json"
    cmd = [*(wrapper or []), ctx.python, "-m", "kdloss.selftest", "--worker", worker, "--device", ctx.device,
           "--result", str(result_path), "--seconds", f"{seconds_for_worker or budget:.1f}"]
    cmd += ["--quick"] if ctx.quick else []
    for loss in ctx.losses or []:
        cmd += ["--loss", loss]
    cmd += extra_args or []
    rc, seconds, tail = run_logged(cmd, title or worker, ctx, budget + GRACE_S, env)
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    return result, rc, seconds, tail


def _from_worker(name: str, result: dict | None, rc: int | None, seconds: float, tail: str,
                 budget: float) -> StageResult:
    if result is None:
        why = "killed after its time budget" if rc is None else f"worker exited with code {rc} before reporting"
        return StageResult(name, "fail", f"{why}: {_tail_line(tail)}", seconds, budget)
    status, reason = result["status"], result["reason"]
    if rc is None:
        status, reason = "fail", f"killed after its time budget ({budget:.0f} s); so far: {reason}"
    elif not result.get("final"):
        status, reason = "fail", f"worker exited with code {rc} mid-stage: {_tail_line(tail)}; so far: {reason}"
    return StageResult(name, status, reason, seconds, budget, result.get("details", {}))


def _tail_line(tail: str) -> str:
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[-300:]


def stage_build(ctx: Context, budget: float) -> StageResult:
    if ctx.device == "cuda" and _build.cuda_toolkit() is None:
        why = cuda_unavailable_reason() or "no CUDA toolkit (nvcc with include/cuda_runtime.h) found"
        if torch.version.cuda is not None:
            why = f"no CUDA toolkit (nvcc) found for torch's CUDA {torch.version.cuda}"
        return StageResult("build", "skip", f"cannot compile CUDA kernels: {why}", 0.0, budget)
    result, rc, seconds, tail = run_worker(ctx, "build", budget)
    return _from_worker("build", result, rc, seconds, tail, budget)


def _pytest_plugin_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def pytest_command(ctx: Context, junit: Path) -> tuple[list[str], dict]:
    """The pytest command line and environment of the tests stage."""
    cmd = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", f"--junitxml={junit}"]
    env = {"KDLOSS_TEST_DEVICE": ctx.device}
    keywords = []
    if ctx.device == "cuda":
        cmd.append(str(TESTS_DIR))
        cores = os.cpu_count() or 1
        if _pytest_plugin_available("xdist") and cores >= 4:
            workers = min(8, cores // 2)  # the tests also compute CPU references: two cores each
            cmd += ["-n", str(workers)]
            env["OMP_NUM_THREADS"] = str(max(1, cores // workers))
        if _pytest_plugin_available("pytest_timeout"):
            cmd += ["--timeout", "120"]
    else:
        cmd.append(str(TESTS_DIR / "test_cuda.py"))
        if ctx.quick:
            keywords.append("small and float32")
    if ctx.losses:
        keywords.append("(" + " or ".join(ctx.losses) + ")")
    if keywords:
        cmd += ["-k", " and ".join(keywords)]
    return cmd, env


def parse_junit(path: Path) -> dict:
    """Counts, failing test ids with their first message line, and skip reasons from a JUnit XML."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failures, skips = [], Counter()
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        for child in case:
            message = (child.get("message") or child.text or "").strip().splitlines()
            first = message[0][:300] if message else ""
            if child.tag in ("failure", "error"):
                failures.append({"test": test_id, "kind": child.tag, "message": first})
            elif child.tag == "skipped":
                skips[first] += 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failing": failures[:40], "skip_reasons": dict(skips.most_common(10))}


def stage_tests(ctx: Context, budget: float) -> StageResult:
    if not (TESTS_DIR / "test_cuda.py").exists():
        return StageResult("tests", "skip", f"no test suite at {TESTS_DIR} (run from a kdloss checkout)", 0.0, budget)
    junit = ctx.tmp / "junit.xml"
    cmd, env = pytest_command(ctx, junit)
    rc, seconds, tail = run_logged(cmd, "tests", ctx, budget, env, cwd=PACKAGE_ROOT)
    details: dict = {"command": shlex.join(cmd), "env": env}
    if rc is None or not junit.exists():
        why = f"killed after its time budget ({budget:.0f} s)" if rc is None else f"pytest exited with code {rc}"
        return StageResult("tests", "fail", f"{why}: {_tail_line(tail)}", seconds, budget, details)
    details.update(parse_junit(junit))
    summary = f"{details['passed']} passed, {details['failures']} failed, {details['errors']} errors, " \
              f"{details['skipped']} skipped"
    if rc == 0 and details["tests"] > 0:
        return StageResult("tests", "pass", summary, seconds, budget, details)
    if rc == 5 or details["tests"] == 0:
        return StageResult("tests", "fail", "no tests collected", seconds, budget, details)
    first = details["failing"][0]["test"] if details["failing"] else _tail_line(tail)
    return StageResult("tests", "fail", f"{summary} (first: {first})", seconds, budget, details)


def stage_fuzz(ctx: Context, budget: float) -> StageResult:
    result, rc, seconds, tail = run_worker(ctx, "fuzz", budget)
    return _from_worker("fuzz", result, rc, seconds, tail, budget)


SANITIZER_TOOLS = ("memcheck", "racecheck")
SANITIZER_STARTUP_S = 25.0  # torch's import and CUDA start-up run under the sanitizer too


def _sanitizer_verdict(tool: str, text: str, rc: int | None, probe: dict | None) -> tuple[str, str, int | None]:
    """(status, reason, error count) of one compute-sanitizer run from its output."""
    if re.search(r"[Dd]evice not supported|not supported on this (device|platform)", text):
        return "skip", "compute-sanitizer does not support this device here (e.g. a gVisor sandbox)", None
    match = re.search(r"ERROR SUMMARY: (\d+) error", text)
    race = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    errors = int(race.group(2)) if race else (int(match.group(1)) if match else None)
    findings = [ln.strip() for ln in text.splitlines()
                if ln.startswith("=========") and re.search(r"Invalid|Error|error|hazard|Race|race", ln)]
    if rc is None:
        return "fail", "killed after its time budget", errors
    if errors is None:
        return "fail", f"no sanitizer summary in the output (exit {rc}): {_tail_line(text)}", None
    if errors or rc != 0:
        first = findings[0] if findings else _tail_line(text)
        probe_reason = f"; probe: {probe['reason']}" if probe and probe.get("status") != "pass" else ""
        return "fail", f"{errors} errors (exit {rc}): {first[:300]}{probe_reason}", errors
    ran = probe["reason"] if probe else "probe did not report"
    return "pass", f"0 errors; {ran}", 0


def stage_sanitizer(ctx: Context, budget: float) -> StageResult:
    start = time.monotonic()
    if ctx.device == "cpu":
        result, rc, seconds, tail = run_worker(ctx, "probe", budget, ["--tool", "none"], title="probe")
        probe = _from_worker("sanitizer", result, rc, seconds, tail, budget)
        if probe.status != "pass":
            return probe
        reason = f"compute-sanitizer checks CUDA kernels (--device cpu); the probe ran without it: {probe.reason}"
        return StageResult("sanitizer", "skip", reason, seconds, budget, {"probe": probe.details})
    sanitizer = find_compute_sanitizer()
    if sanitizer is None:
        return StageResult("sanitizer", "skip", "compute-sanitizer not found (not on PATH nor in the CUDA toolkit)",
                           0.0, budget)
    tools = []
    for index, tool in enumerate(SANITIZER_TOOLS):
        share = (budget - (time.monotonic() - start)) / (len(SANITIZER_TOOLS) - index)
        wrapper = [sanitizer, "--tool", tool, "--error-exitcode", "86", "--report-api-errors", "no"]
        env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else {}
        worker_s = max(5.0, share - SANITIZER_STARTUP_S)
        result, rc, seconds, tail = run_worker(ctx, "probe", share, ["--tool", tool], wrapper=wrapper, env=env,
                                               title=f"sanitizer-{tool}", seconds_for_worker=worker_s)
        text = (ctx.tmp / f"sanitizer_{tool}.out").read_text(errors="replace")
        status, reason, errors = _sanitizer_verdict(tool, text, rc, result)
        tools.append({"tool": tool, "status": status, "reason": reason, "errors": errors, "seconds": seconds,
                      "probe": (result or {}).get("details", {})})
    statuses = {t["status"] for t in tools}
    status = "fail" if "fail" in statuses else ("skip" if statuses == {"skip"} else "pass")
    reason = "; ".join(f"{t['tool']}: {t['status']} ({t['reason']})" for t in tools)
    return StageResult("sanitizer", status, reason, time.monotonic() - start, budget, {"tools": tools})


def stage_bench(ctx: Context, budget: float) -> StageResult:
    result, rc, seconds, tail = run_worker(ctx, "bench", budget)
    return _from_worker("bench", result, rc, seconds, tail, budget)


RUNNERS = {"build": stage_build, "tests": stage_tests, "fuzz": stage_fuzz, "sanitizer": stage_sanitizer,
           "bench": stage_bench}
NEEDS_DEVICE = {"tests", "fuzz", "sanitizer", "bench"}


def run_stages(ctx: Context, stages: list[str], budgets: dict, total: float) -> list[StageResult]:
    start = time.monotonic()
    missing_cuda = cuda_unavailable_reason() if ctx.device == "cuda" else None
    results = []
    for name in STAGES:
        budget = float(budgets[name])
        left = total - (time.monotonic() - start)
        if name not in stages:
            result = StageResult(name, "skip", "not selected (--stage)", 0.0, budget)
        elif missing_cuda and name in NEEDS_DEVICE:
            result = StageResult(name, "skip", f"needs a CUDA device: {missing_cuda}", 0.0, budget)
        elif left < MIN_STAGE_S:
            result = StageResult(name, "skip", f"no time left of the --total budget ({total:.0f} s)", 0.0, budget)
        else:
            budget = min(budget, left)
            print(f"[selftest] {name}: started (budget {budget:.0f} s)", flush=True)
            try:
                result = RUNNERS[name](ctx, budget)
            except Exception as exc:  # the harness itself failing is a stage failure, not a crash
                result = StageResult(name, "fail", f"selftest error: {_last_line(exc)}", 0.0, budget)
        result.name = name
        results.append(result)
        print(f"[selftest] {name}: {result.status} ({result.seconds:.1f} s) {result.reason}", flush=True)
    return results


# --------------------------------------------------------------------------------------------
# summary


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(summary: dict) -> str:
    env, stages = summary["environment"], summary["stages"]
    verdict = "PASS" if summary["passed"] else "FAIL"
    gpus = ", ".join(env["gpus"]) or "no GPU"
    lines = [
        f"# kdloss selftest: {summary['device']}{' (quick)' if summary['quick'] else ''} — {verdict}",
        "",
        (f"`{summary['command']}` · {summary['started']} · {summary['seconds']:.0f} s "
         f"(total budget {summary['total_budget_s']:.0f} s)"),
        "",
        (f"{gpus} · torch {env['torch']} (CUDA {env['torch_cuda']}) · CUDA toolkit {env['cuda_toolkit']} · "
         f"compute-sanitizer {env['compute_sanitizer']} · {env['cpu_count']} CPUs ({env['cpu_capability']}) · "
         f"kdloss {env['kdloss']}"),
        "",
        "| stage | status | time | budget | reason |",
        "|---|---|---|---|---|",
    ]
    for s in stages:
        lines.append(f"| {s['name']} | {s['status'].upper()} | {s['seconds']:.1f} s | {s['budget_s']:.0f} s | "
                     f"{_cell(s['reason'])} |")
    for s in stages:
        section = SECTIONS.get(s["name"])
        body = section(s["details"]) if section and s["details"] else []
        if body:
            lines += ["", f"## {s['name']}", "", *body]
    return "\n".join(lines) + "\n"


def _md_build(d: dict) -> list[str]:
    setup = (f"{d.get('parallel_builds')} parallel build processes × {d.get('jobs_per_build')} compiler jobs "
             f"(MAX_JOBS {d.get('max_jobs')}), TORCH_CUDA_ARCH_LIST {d.get('arch_list')}")
    out = [setup, "", "| kernel | device | status | seconds |", "|---|---|---|---|"]
    for r in sorted(d.get("kernels", []), key=lambda r: (r["device"], r["kernel"])):
        error = f" ({_cell(r['error'][-200:])})" if r.get("error") else ""
        out.append(f"| {r['kernel']} | {r['device']} | {r['status']}{error} | {r['seconds']:.1f} |")
    return out


def _md_tests(d: dict) -> list[str]:
    out = [f"`{d.get('command', '')}`", ""]
    if "tests" in d:
        out.append(f"{d['passed']} passed, {d['failures']} failed, {d['errors']} errors, {d['skipped']} skipped")
    for f in d.get("failing", []):
        out.append(f"- FAIL `{f['test']}`: {_cell(f['message'])}")
    for reason, count in d.get("skip_reasons", {}).items():
        out.append(f"- skipped ×{count}: {_cell(reason)}")
    return out


def _md_fuzz(d: dict) -> list[str]:
    out = ["| loss | dtype | examples | worst error | its bound | verdict |", "|---|---|---|---|---|---|"]
    for r in d.get("runs", []):
        what = f" ({r['what']})" if r.get("what") else ""
        out.append(f"| {r['loss']} | {r['dtype']} | {r['examples']} | {_fmt(r.get('worst_error'))}{what} | "
                   f"{_fmt(r.get('bound'))} | {r['verdict']} |")
    failing = [r for r in d.get("runs", []) if r.get("reproducer") or r.get("errors")]
    for r in failing:
        out += ["", f"{r['loss']} {r['dtype']}: {_cell('; '.join(r.get('errors') or []))}"]
        if r.get("reproducer"):
            out += ["```python", r["reproducer"].rstrip(), "```"]
    return out


def _md_sanitizer(d: dict) -> list[str]:
    if "tools" not in d:
        probe = d.get("probe", {})
        return [f"probe without a sanitizer: {len(probe.get('cases', []))} cases"] if probe else []
    out = ["| tool | status | errors | probe cases | seconds | reason |", "|---|---|---|---|---|---|"]
    for t in d["tools"]:
        cases = t.get("probe", {}).get("cases", [])
        out.append(f"| {t['tool']} | {t['status']} | {_fmt(t['errors'])} | {len(cases)} | {t['seconds']:.1f} | "
                   f"{_cell(t['reason'])} |")
    return out


def _impl_cell(result: dict | None) -> str:
    if not result:
        return "—"
    if "error" in result:
        return f"error: {_cell(result['error'][-80:])}"
    if "skipped" in result:
        return f"skipped ({_cell(result['skipped'])})"
    return f"{_fmt(result['median_ms'])}"


def _md_bench(d: dict) -> list[str]:
    intro = (f"On {d.get('device_name')}. Times in ms per forward + backward step (median of event-timed steps;"
             " 'GPU' is the summed kernel time of one step, which the time goal is judged on). 'extra' is the peak"
             " memory of one step beyond the gradients it returns.")
    header = ("| workload | shape | dtype | goal (H100) | goal here | kdloss | kdloss GPU | extra MiB | memory goal |"
              " eager | compile | others | H100 reference | verdict |")
    out = [intro, "", header, "|" + "---|" * 14]
    for r in d.get("goals", []):
        res = r["results"]
        kd = res.get("kdloss") or {}
        others = ", ".join(f"{name} {_impl_cell(v)}" for name, v in res.items()
                           if name not in ("kdloss", "eager", "compile"))
        memory = r["memory_goal"] + (f" (≤ {r['memory_limit_mib']:.0f} MiB)" if r.get("memory_limit_mib") else "")
        out.append(f"| {r['workload']} | {r['shape']} | {r['dtype']} | ≤ {_fmt(r['goal_ms_h100'])} | "
                   f"≤ {_fmt(r['goal_ms_here'])} | {_impl_cell(kd)} | {_fmt(kd.get('gpu_ms'))} | "
                   f"{_fmt(kd.get('extra_mib'), 1)} | {_cell(memory) or '—'} | {_impl_cell(res.get('eager'))} | "
                   f"{_impl_cell(res.get('compile'))} | {others or '—'} | {_cell(r['reference_h100']) or '—'} | "
                   f"{_cell(r.get('verdict', '—'))} |")
    return out


SECTIONS = {"build": _md_build, "tests": _md_tests, "fuzz": _md_fuzz, "sanitizer": _md_sanitizer,
            "bench": _md_bench}


def write_summary(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    (out / "summary.md").write_text(render_markdown(summary))


# --------------------------------------------------------------------------------------------
# command line


def _parse_budgets(items: list[str] | None) -> dict:
    budgets = {}
    for item in items or []:
        name, _, seconds = item.partition("=")
        if name not in STAGES or not seconds:
            raise SystemExit(f"--budget takes STAGE=SECONDS with STAGE one of {', '.join(STAGES)}; got {item!r}")
        budgets[name] = float(seconds)
    return budgets


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m kdloss.selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, default=Path("selftest-out"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="small budgets and shapes (CI)")
    parser.add_argument("--stage", action="append", choices=STAGES, help="run only these stages (repeatable)")
    parser.add_argument("--loss", action="append", choices=_registry.names(), help="only these losses (repeatable)")
    parser.add_argument("--budget", action="append", metavar="STAGE=SECONDS", help="a stage's time budget")
    parser.add_argument("--total", type=float, help="seconds for the whole run")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--tool", default="none", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.worker:
        return worker_main(opts)
    key = (opts.device, opts.quick)
    budgets = {**BUDGETS[key], **_parse_budgets(opts.budget)}
    total = opts.total or TOTALS[key]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    opts.out.mkdir(parents=True, exist_ok=True)
    log_path = opts.out / "selftest.log"
    log_path.write_text(f"kdloss selftest, started {started}\n")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kdloss-selftest-") as tmp:
        ctx = Context(opts.device, opts.quick, opts.loss, log_path, Path(tmp))
        results = run_stages(ctx, opts.stage or list(STAGES), budgets, total)
    passed = all(r.status != "fail" for r in results)
    summary = {
        "command": "python -m kdloss.selftest " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": opts.device, "quick": opts.quick, "started": started, "seconds": time.monotonic() - start,
        "total_budget_s": total, "passed": passed, "exit_code": 0 if passed else 1,
        "environment": environment(), "stages": [asdict(r) for r in results],
    }
    write_summary(opts.out, summary)
    print(render_markdown(summary))
    print(f"[selftest] wrote {opts.out / 'summary.json'}, {opts.out / 'summary.md'} and {log_path}")
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
