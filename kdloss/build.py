"""Prebuild kdloss's kernels and report what was built: ``python -m kdloss.build``.

Options:
  --device cpu|cuda|all   backends to build (default: all that apply here)
  --loss NAME             one loss (default: every loss with sources)
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


def jit_build(losses: list[str], devices: list[str], verbose: bool) -> list[tuple[str, str, str, float]]:
    """Builds (or finds cached) every (loss, device); returns rows (loss, device, status, seconds)."""
    rows = []
    for device in devices:
        for loss in losses:
            start = time.perf_counter()
            try:
                path = _build.build(loss, device, verbose=verbose)
                status = f"ok  {path}"
            except Exception as exc:  # report and continue with the others
                status = f"FAILED  {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            rows.append((loss, device, status, time.perf_counter() - start))
    return rows


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
        manifest[device] = {"hash": _build.backend_hash(device), "torch": torch.__version__}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    print(f"wrote {', '.join(f'libkdloss_{d}.so' for d in devices)} and manifest.json to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdloss.build", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--loss", action="append", help="loss name (repeatable); default: all")
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
    rows = jit_build(losses, devices, args.verbose)
    for loss, device, status, seconds in rows:
        print(f"  {loss:<16} {device:<5} {seconds:6.1f}s  {status}")
    if "cuda" not in devices and args.device == "all":
        print("  (CUDA kernels not built: torch has no CUDA or no nvcc/CUDA toolkit was found)")
    failed = [r for r in rows if r[2].startswith("FAILED")]
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
