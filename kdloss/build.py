"""Prebuild kdloss's kernels and report what was built: ``python -m kdloss.build``.

Options:
  --device cpu|cuda|all   backends to build (default: all that apply here)
  --loss NAME             one loss (default: every loss with sources)
  --jobs N                libraries compiled at once, each in its own process (default: the CPU count)
  --strict                exit 1 if any requested kernel fails to build
  --aot [--out DIR]       ahead-of-time CMake build of one library per backend into kdloss/_lib
                          (or DIR), with the manifest the loader checks before using it
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import _build


def _devices(choice: str) -> list[str]:
    if choice != "all":
        return [choice]
    return ["cpu"] + (["cuda"] if _build.cuda_toolkit() else [])


def build_one(loss: str, device: str, verbose: bool) -> tuple[str, str, str, float]:
    """Builds (or finds cached) one library; returns the row (loss, device, status, seconds)."""
    start = time.perf_counter()
    try:
        path = _build.build(loss, device, verbose=verbose)
        status = f"ok  {path}"
    except Exception as exc:  # report and continue with the others
        status = f"FAILED  {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    return loss, device, status, time.perf_counter() - start


def jit_build(losses: list[str], devices: list[str], verbose: bool, jobs: int = 1) -> list[tuple[str, str, str, float]]:
    """Builds (or finds cached) every (loss, device); returns rows (loss, device, status, seconds).

    With ``jobs`` > 1 the libraries compile concurrently, each in a fresh process (the build's file
    lock and manifest make concurrent builds of one library safe)."""
    todo = [(loss, device) for device in devices for loss in losses]
    if jobs <= 1 or len(todo) <= 1:
        return [build_one(loss, device, verbose) for loss, device in todo]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # no fork of a process that holds OpenMP threads
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context) as pool:
        futures = [pool.submit(build_one, loss, device, verbose) for loss, device in todo]
        return [future.result() for future in futures]


def aot_build(devices: list[str], out: Path) -> None:
    """CMake build of libkdloss_<device>.so into ``out`` plus manifest.json (see CMakeLists.txt)."""
    root = Path(__file__).resolve().parent.parent
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for device in devices:
        build_dir = root / "build" / f"aot-{device}"
        cmd = [
            "cmake", "-S", str(root), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DKDLOSS_WITH_CUDA={'ON' if device == 'cuda' else 'OFF'}",
            f"-DKDLOSS_OUTPUT_DIR={out}",
            f"-DKDLOSS_CXX_FLAGS={' '.join(_build.cpu_flags())}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
        if device == "cuda":
            cmd.append(f"-DCUDAToolkit_ROOT={_build.cuda_toolkit()}")
        subprocess.run(cmd, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1)], check=True)
        library = out / f"libkdloss_{device}.so"
        manifest[device] = {"hash": _build.backend_hash(device), "torch": torch.__version__,
                            "size": library.stat().st_size, "sha256": _build.file_sha256(library)}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    print(f"wrote {', '.join(f'libkdloss_{d}.so' for d in devices)} and manifest.json to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdloss.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--loss", action="append", help="loss name (repeatable); default: all")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="libraries compiled at once, each in its own process (default: the CPU count)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a kernel fails to build")
    parser.add_argument("--verbose", action="store_true", help="show compiler commands")
    parser.add_argument("--aot", action="store_true", help="ahead-of-time CMake build into kdloss/_lib")
    parser.add_argument("--out", type=Path, default=_build.PREBUILT_DIR)
    args = parser.parse_args(argv)
    devices = _devices(args.device)
    if args.aot:
        aot_build(devices, args.out)
        return 0
    losses = args.loss or _build.all_losses()
    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, CUDA toolkit {_build.cuda_toolkit()}")
    print(f"cache: {_build.cache_dir()}")
    start = time.perf_counter()
    rows = jit_build(losses, devices, args.verbose, args.jobs)
    for loss, device, status, seconds in rows:
        print(f"  {loss:<16} {device:<5} {seconds:6.1f}s  {status}")
    print(f"{len(rows)} libraries in {time.perf_counter() - start:.1f} s with --jobs {args.jobs}")
    if "cuda" not in devices and args.device == "all":
        print("  (CUDA kernels not built: torch has no CUDA or no nvcc/CUDA toolkit was found)")
    failed = [r for r in rows if r[2].startswith("FAILED")]
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
