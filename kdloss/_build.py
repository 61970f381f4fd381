"""Finding, building and loading kdloss's compiled kernels.

Each kernel library (a loss with its own sources in the registry, :mod:`kdloss._registry`) has the
CPU and CUDA source files its registry entry lists. They register implementations of the ``kdloss::``
ops (schemas live in :mod:`kdloss._ops`) with
``TORCH_LIBRARY_IMPL``; loading the shared library is all that is needed to make them callable.

Order of preference for a (loss, device type):

1. a prebuilt library in ``kdloss/_lib/`` (ahead-of-time CMake build, see ``python -m
   kdloss.build --aot``) whose manifest matches the current sources;
2. a just-in-time build with ``torch.utils.cpp_extension.load`` + ninja, cached in
   ``$KDLOSS_CACHE_DIR`` (default ``~/.cache/kdloss``) under a name that hashes the torch version,
   the compiler flags and the sources, guarded by a file lock so concurrent processes build once.
   The sources are copied into the build directory and compiled from there (so every install of the
   same sources shares one build), and a manifest next to the library records its size and SHA-256:
   a cached library is loaded only if it matches, else it is rebuilt.

CUDA sources are compiled whenever torch was built with CUDA and a CUDA toolkit (nvcc) is found —
a GPU need not be visible. Nothing here raises at import; :func:`load` records the failure and
returns False, :func:`require` raises :class:`KernelUnavailableError` with the recorded reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from . import _registry

__all__ = [
    "KernelUnavailableError",
    "build",
    "cache_dir",
    "cuda_toolkit",
    "failure",
    "load",
    "require",
    "sources",
]

PACKAGE_DIR = Path(__file__).resolve().parent
PREBUILT_DIR = Path(os.environ.get("KDLOSS_PREBUILT_DIR") or PACKAGE_DIR / "_lib")
DEVICE_TYPES = ("cpu", "cuda")


class KernelUnavailableError(RuntimeError):
    """Raised by ``backend="kernel"`` when the compiled kernel cannot be built or loaded."""


_lock = threading.Lock()
_loaded: dict[tuple[str, str], bool] = {}
_failures: dict[tuple[str, str], str] = {}
_prebuilt_loaded: dict[str, bool] = {}


def csrc_dir() -> Path:
    """Directory holding the C++/CUDA sources: ``$KDLOSS_CSRC_DIR`` if set, else ``kdloss/_csrc`` in
    a wheel, else ``csrc/`` in a checkout."""
    override = os.environ.get("KDLOSS_CSRC_DIR")
    if override:
        return Path(override)
    packaged = PACKAGE_DIR / "_csrc"
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / "csrc"


def cache_dir() -> Path:
    """Root of the JIT build cache (``$KDLOSS_CACHE_DIR`` or ``$XDG_CACHE_HOME/kdloss``)."""
    env = os.environ.get("KDLOSS_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "kdloss"


def sources(loss: str, device_type: str) -> list[Path]:
    """Source files of one kernel library for one backend (``device_type`` is ``"cpu"`` or ``"cuda"``),
    as its registry entry lists them."""
    entry = _registry.get(loss)
    listed = entry.cpu_sources if device_type == "cpu" else entry.cuda_sources
    return [csrc_dir() / relative for relative in listed]


def all_losses() -> list[str]:
    """Names of the kernel libraries (losses with their own sources)."""
    return _registry.kernel_libraries()


def headers() -> list[Path]:
    """Every file under ``csrc/include`` (``.h``, ``.cuh``, ...): part of the cache key, staged with the sources."""
    return sorted(p for p in (csrc_dir() / "include").rglob("*") if p.is_file())


def cuda_toolkit() -> str | None:
    """Root of a usable CUDA toolkit when torch has CUDA support and nvcc exists, else None.

    Candidates: $CUDA_HOME, $CUDA_PATH, torch's own guess, /usr/local/cuda. torch guesses from the
    location of ``nvcc`` on PATH, which is wrong for wrapper scripts (e.g. /usr/local/bin/nvcc), so a
    candidate must also hold ``include/cuda_runtime.h``.
    """
    if torch.version.cuda is None:
        return None
    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  "/usr/local/cuda"]
    for root in candidates:
        if root and (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "include" / "cuda_runtime.h").exists():
            return str(root)
    return None


def _cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return "DEFAULT"


def cpu_flags() -> list[str]:
    """Host compiler flags. AVX2 needs the explicit CPU_CAPABILITY macros (see docs/building.md)."""
    flags = ["-O3", "-fopenmp", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"]
    if _cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    sanitize = os.environ.get("KDLOSS_SANITIZE")
    if sanitize:
        # any finding aborts the process, so a sanitized test run fails instead of printing a warning
        flags += [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
    return flags


def cuda_arch_list() -> str:
    """Architectures to compile for: $TORCH_CUDA_ARCH_LIST, the visible GPUs, or a default set."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return os.environ.get("KDLOSS_CUDA_ARCH_LIST", "8.0;9.0")


def cuda_flags() -> list[str]:
    return ["-O3", "--use_fast_math", "-lineinfo", "-std=c++17"]


def source_hash(paths: list[Path], extra: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for item in extra:
        digest.update(item.encode())
    return digest.hexdigest()[:16]


def _build_key(loss: str, device_type: str) -> tuple[list[Path], str]:
    srcs = sources(loss, device_type)
    extra = [torch.__version__, str(torch.version.cuda), sys.version, *cpu_flags()]
    if device_type == "cuda":
        extra += [cuda_arch_list(), *cuda_flags()]
    return srcs, source_hash(srcs + headers(), extra)


def env_flag(name: str) -> bool:
    """True when the environment variable is set to something other than "", "0", "false", "no"."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


@contextlib.contextmanager
def _arch_list_env(device_type: str):
    """Sets TORCH_CUDA_ARCH_LIST for the duration of a CUDA build only (torch reads it there)."""
    if device_type != "cuda" or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        yield
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    try:
        yield
    finally:
        os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def _ensure_ninja_on_path() -> None:
    try:
        import ninja  # type: ignore[import-not-found]

        bin_dir = ninja.BIN_DIR
    except Exception:
        return
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


MANIFEST_NAME = "kdloss_build.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_build_manifest(build_dir: Path, library: Path, key: str, seconds: float) -> None:
    """Records what a finished build produced (size and SHA-256 of the library, the cache key), so
    that a later process can tell a complete library from a truncated or foreign one."""
    manifest = {"library": library.name, "size": library.stat().st_size, "sha256": file_sha256(library),
                "key": key, "torch": torch.__version__, "seconds": round(seconds, 2)}
    tmp = build_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, build_dir / MANIFEST_NAME)


def valid_library(build_dir: Path, key: str) -> Path | None:
    """The library of a finished build in ``build_dir`` if its manifest matches ``key`` and the file
    on disk has the recorded size and SHA-256; None otherwise (never built, interrupted, truncated —
    e.g. a partial copy of a cache directory, which keeps its mtimes so ninja would think it
    current — or overwritten). Loading a truncated library would kill the process with SIGBUS."""
    try:
        manifest = json.loads((build_dir / MANIFEST_NAME).read_text())
        library = build_dir / manifest["library"]
        if manifest["key"] != key or library.stat().st_size != manifest["size"]:
            return None
        return library if file_sha256(library) == manifest["sha256"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _discard_build(build_dir: Path) -> None:
    """Removes everything in ``build_dir`` but the lock, so that ninja rebuilds from scratch."""
    for entry in build_dir.iterdir():
        if entry.name == "build.lock":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _stage_sources(srcs: list[Path], build_dir: Path) -> tuple[list[Path], Path]:
    """Copies the sources and headers into ``build_dir/src``. The build directory is keyed by their
    content, so every install of the same sources (two virtualenvs, a checkout and site-packages)
    then compiles the same paths: ninja records absolute source paths, and compiling each
    install's own copy would make them rebuild each other's libraries."""
    root = csrc_dir()
    staged_root = build_dir / "src"
    staged = []
    for path in [*srcs, *headers()]:
        target = staged_root / path.relative_to(root)
        if not target.exists() or target.read_bytes() != path.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        if path in srcs:
            staged.append(target)
    return staged, staged_root / "include"


def _announce(message: str) -> None:
    if not env_flag("KDLOSS_QUIET_BUILD"):
        print(f"kdloss: {message}", file=sys.stderr, flush=True)


INSTALL_COMPILER_HINT = (
    "install a C++ compiler with OpenMP — Debian/Ubuntu: `sudo apt-get install g++`; Fedora/RHEL: "
    "`sudo dnf install gcc-c++`; conda: `conda install -c conda-forge cxx-compiler`; macOS: "
    "`xcode-select --install` — or point $CXX at one"
)


def host_compiler() -> str:
    """The C++ compiler torch's extension builder will run (``$CXX``, default ``c++``), checked with
    ``--version``; raises RuntimeError naming what to install when there is none."""
    import subprocess

    compiler = os.environ.get("CXX", "c++")
    found = shutil.which(compiler)
    if found is None:
        raise RuntimeError(f"no C++ compiler found ({compiler!r} is not on PATH): {INSTALL_COMPILER_HINT}")
    try:
        subprocess.run([found, "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"the C++ compiler {found} does not run ({type(exc).__name__}): "
                           f"{INSTALL_COMPILER_HINT}") from None
    return found


def missing_cuda_toolkit_message() -> str:
    """What to install when torch has CUDA but no CUDA toolkit (nvcc) is found."""
    version = torch.version.cuda or "?"
    major = version.split(".")[0]
    return (f"torch is built with CUDA {version} but no CUDA toolkit (nvcc) was found in $CUDA_HOME, "
            f"$CUDA_PATH or /usr/local/cuda: install the toolkit matching CUDA {version} (NVIDIA's "
            f"installer, or `conda install -c nvidia cuda-nvcc cuda-cudart-dev` with CUDA {major}.x) "
            "and set CUDA_HOME to its root")


def build(loss: str, device_type: str, verbose: bool = False) -> Path:
    """Compile one loss's kernels for one backend (or reuse the cache) and load them.

    Returns the path of the shared library. Raises on any build or load error. A cached library is
    loaded only if it matches the manifest its build wrote (:func:`valid_library`); otherwise it is
    rebuilt. Compiling prints one line on stderr when it starts and one when it ends
    (``KDLOSS_QUIET_BUILD=1`` silences them).
    """
    import time

    from filelock import FileLock

    srcs, digest = _build_key(loss, device_type)
    if not srcs or not all(p.exists() for p in srcs):
        raise FileNotFoundError(f"no {device_type} sources for loss {loss!r} under {csrc_dir()}")
    if device_type == "cuda" and cuda_toolkit() is None:
        raise RuntimeError(missing_cuda_toolkit_message())
    name = f"kdloss_{loss}_{device_type}_{digest}"
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(build_dir / "build.lock")):
        library = valid_library(build_dir, digest)
        if library is not None:
            torch.ops.load_library(str(library))
            return library
        host_compiler()
        _discard_build(build_dir)
        staged, include = _stage_sources(srcs, build_dir)
        _announce(f"compiling the {loss} kernels for {device_type} (first use of this version; "
                  f"cached in {build_dir}) ...")
        start = time.perf_counter()
        library = _compile(name, staged, include, build_dir, device_type, verbose)
        seconds = time.perf_counter() - start
        write_build_manifest(build_dir, library, digest, seconds)
        _announce(f"compiled the {loss} kernels for {device_type} in {seconds:.1f} s")
    return library


def _compile(name: str, staged: list[Path], include: Path, build_dir: Path, device_type: str, verbose: bool) -> Path:
    """``torch.utils.cpp_extension.load`` of the staged sources (also loads the library)."""
    from torch.utils import cpp_extension

    if device_type == "cuda":
        cpp_extension.CUDA_HOME = cuda_toolkit()  # torch resolved its module-level guess at import
    _ensure_ninja_on_path()
    sanitize = os.environ.get("KDLOSS_SANITIZE")
    with _arch_list_env(device_type):
        result = cpp_extension.load(
            name=name,
            sources=[str(p) for p in staged],
            extra_cflags=cpu_flags(),
            extra_cuda_cflags=cuda_flags() if device_type == "cuda" else None,
            extra_ldflags=["-fopenmp"] + ([f"-fsanitize={sanitize}"] if sanitize else []),
            extra_include_paths=[str(include)],
            build_directory=str(build_dir),
            is_python_module=False,
            with_cuda=device_type == "cuda",
            verbose=verbose,
        )
    return Path(result) if isinstance(result, (str, os.PathLike)) else build_dir / f"{name}.so"


def _prebuilt_manifest() -> dict:
    path = PREBUILT_DIR / "manifest.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def backend_hash(device_type: str) -> str:
    """Hash of every source of one backend, used to match a prebuilt library to the sources."""
    srcs = [p for loss in all_losses() for p in sources(loss, device_type)]
    return source_hash(srcs + headers(), [torch.__version__, str(torch.version.cuda), *cpu_flags()])


def _load_prebuilt(device_type: str) -> bool:
    if device_type in _prebuilt_loaded:
        return _prebuilt_loaded[device_type]
    ok = False
    lib = PREBUILT_DIR / f"libkdloss_{device_type}.so"
    entry = _prebuilt_manifest().get(device_type)
    if lib.exists() and entry and entry.get("hash") == backend_hash(device_type):
        if "size" in entry and (lib.stat().st_size != entry["size"] or file_sha256(lib) != entry.get("sha256")):
            _failures[("*", device_type)] = f"prebuilt {lib} does not match its manifest (size or SHA-256)"
        else:
            try:
                torch.ops.load_library(str(lib))
                ok = True
            except Exception as exc:  # fall back to the JIT build
                _failures[("*", device_type)] = f"prebuilt {lib} failed to load: {exc}"
    _prebuilt_loaded[device_type] = ok
    return ok


def load(loss: str, device_type: str) -> bool:
    """Make the kernels of ``loss`` for ``device_type`` callable; True on success, never raises."""
    key = (loss, device_type)
    if key in _loaded:
        return _loaded[key]
    with _lock:
        if key in _loaded:
            return _loaded[key]
        from . import _ops  # noqa: F401  (schemas must exist before implementations register)

        ok = False
        if env_flag("KDLOSS_DISABLE_KERNELS"):
            _failures[key] = "disabled by KDLOSS_DISABLE_KERNELS"
        elif device_type not in DEVICE_TYPES:
            _failures[key] = f"kdloss has no kernels for device type {device_type!r}"
        elif device_type == "cuda" and torch.version.cuda is None:
            _failures[key] = ("this torch has no CUDA support (torch.version.cuda is None): install a CUDA "
                              "build of torch (https://pytorch.org/get-started/locally/)")
        elif device_type == "cuda" and cuda_toolkit() is None and not _load_prebuilt("cuda"):
            _failures[key] = missing_cuda_toolkit_message()
        elif _load_prebuilt(device_type):
            ok = True
        else:
            try:
                build(loss, device_type, verbose=env_flag("KDLOSS_VERBOSE_BUILD"))
                ok = True
            except Exception as exc:
                _failures[key] = f"{type(exc).__name__}: {exc}"
        _loaded[key] = ok
        return ok


def is_loaded(loss: str, device_type: str) -> bool:
    """Whether the kernels of ``loss`` for ``device_type`` are loaded (never loads them)."""
    return _loaded.get((loss, device_type), False)


def failure(loss: str, device_type: str) -> str | None:
    """Why the kernels of ``loss`` for ``device_type`` are unavailable (None if they loaded)."""
    return _failures.get((loss, device_type)) or _failures.get(("*", device_type))


def require(loss: str, device_type: str) -> None:
    """Load the kernels or raise :class:`KernelUnavailableError` with the reason."""
    if not load(loss, device_type):
        raise KernelUnavailableError(
            f"kdloss {loss} kernel for {device_type} is unavailable: {failure(loss, device_type)}"
        )


def clear_cache() -> None:
    """Delete the JIT build cache (forces a rebuild in the next process)."""
    shutil.rmtree(cache_dir(), ignore_errors=True)
