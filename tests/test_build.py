"""The JIT build as a user meets it: a cheap import, a cache that two installs share, cached libraries
validated before loading (a truncated one must not kill the process), messages that name what to
install, a line on stderr around each compile, and the parallel prebuild. Subprocesses where the
process state matters (imports, loading libraries, environment variables)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from kdloss import _build, _dispatch


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_import_loads_neither_dynamo_nor_a_compiler(tmp_path):
    cache = tmp_path / "cache"
    result = _run_python(
        """
        import sys
        import kdloss
        loaded = [m for m in ("torch._dynamo", "torch._inductor", "torch.utils.cpp_extension") if m in sys.modules]
        assert not loaded, loaded
        print("OK")
        """,
        KDLOSS_CACHE_DIR=str(cache),
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr
    assert not cache.exists(), "import compiled something"


def test_constant_result_mark_is_the_one_torch_sets():
    def ours():
        return 0

    def theirs():
        return 0

    _dispatch.assume_constant_result(ours)
    torch.compiler.assume_constant_result(theirs)
    assert vars(ours) == vars(theirs) == {"_dynamo_marked_constant": True}


def _cached_build_dir(loss: str) -> Path:
    """The build directory of ``loss`` (CPU) in this session's cache, built if needed."""
    _build.require(loss, "cpu")
    _, digest = _build._build_key(loss, "cpu")
    return _build.cache_dir() / f"kdloss_{loss}_cpu_{digest}"


MARGIN_MSE_CALL = textwrap.dedent("""
    import warnings, torch
    from kdloss.functional import margin_mse_loss
    from kdloss.reference import margin_mse_reference
    pos, neg, t = torch.randn(4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = margin_mse_loss(pos, neg, t)
    torch.testing.assert_close(out, margin_mse_reference(pos, neg, t))
    print("WARNINGS:", [str(w.message) for w in caught])
""")


def test_truncated_cached_library_is_not_loaded(tmp_path):
    """A partial copy of a cache directory (the library cut short, its mtime newer than its sources)
    used to kill the process with SIGBUS on first use, even with backend="auto"."""
    cache = tmp_path / "cache"
    build_dir = cache / _cached_build_dir("margin_mse").name
    shutil.copytree(_cached_build_dir("margin_mse"), build_dir)
    library = next(build_dir.glob("*.so"))
    _, digest = _build._build_key("margin_mse", "cpu")
    assert _build.valid_library(build_dir, digest) == library
    with open(library, "r+b") as fh:
        fh.truncate(library.stat().st_size // 2)
    assert _build.valid_library(build_dir, digest) is None
    # No compiler, so the rebuild fails at once: "auto" falls back with its warning, which names what
    # to install, and "kernel" raises with the same reason.
    code = MARGIN_MSE_CALL + textwrap.dedent("""
        import kdloss
        try:
            margin_mse_loss(pos, neg, t, backend="kernel")
        except kdloss.KernelUnavailableError as exc:
            print("RAISED:", exc)
        """)
    result = _run_python(code, KDLOSS_CACHE_DIR=str(cache), CXX=str(tmp_path / "no-such-c++"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "using the pure-PyTorch reference" in result.stdout
    for line in ("WARNINGS:", "RAISED:"):
        (said,) = [x for x in result.stdout.splitlines() if x.startswith(line)]
        assert "no C++ compiler found" in said and "apt-get install g++" in said and "CalledProcessError" not in said


def test_second_install_reuses_the_cached_library_without_compiling(tmp_path):
    """Another copy of the sources (a second install: another venv, site-packages vs a checkout)
    loads the library the first one built; no compiler is needed for that."""
    cache = tmp_path / "cache"
    shutil.copytree(_cached_build_dir("margin_mse"), cache / _cached_build_dir("margin_mse").name)
    other_install = tmp_path / "site-packages" / "kdloss" / "_csrc"
    shutil.copytree(_build.csrc_dir(), other_install)
    result = _run_python(MARGIN_MSE_CALL + "\nfrom kdloss import _build\nassert _build.load('margin_mse', 'cpu')\n",
                         KDLOSS_CACHE_DIR=str(cache), KDLOSS_CSRC_DIR=str(other_install),
                         CXX=str(tmp_path / "no-such-c++"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNINGS: []" in result.stdout and "compiling" not in result.stderr


def test_missing_cuda_toolkit_message_names_what_to_install(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    message = _build.missing_cuda_toolkit_message()
    assert "nvcc" in message and "CUDA 12.6" in message and "CUDA_HOME" in message


def test_compile_is_announced_on_stderr_and_recorded_in_a_manifest(tmp_path, monkeypatch, capfd):
    """One line when compiling starts, one with the time when it ends; the next process finds the
    manifest and loads without compiling (no line)."""
    compiled, loaded = [], []

    def fake_compile(name, staged, include, build_dir, device_type, verbose):
        compiled.append(name)
        assert all(str(p).startswith(str(build_dir / "src")) for p in staged)  # sources staged in the build dir
        library = build_dir / f"{name}.so"
        library.write_bytes(b"\x7fELF not really a library")
        return library

    monkeypatch.setattr(_build, "_compile", fake_compile)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setenv("KDLOSS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KDLOSS_QUIET_BUILD", raising=False)
    first = _build.build("margin_mse", "cpu")
    err = capfd.readouterr().err
    assert "kdloss: compiling the margin_mse kernels for cpu" in err
    assert "kdloss: compiled the margin_mse kernels for cpu in" in err
    second = _build.build("margin_mse", "cpu")
    assert first == second and len(compiled) == 1 and loaded == [str(first)]
    assert capfd.readouterr().err == ""


def test_parallel_prebuild_of_cached_libraries():
    for loss in ("margin_mse", "token_graph"):
        _cached_build_dir(loss)
    result = subprocess.run([sys.executable, "-m", "kdloss.build", "--device", "cpu", "--loss", "margin_mse",
                             "--loss", "token_graph", "--jobs", "2", "--strict"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 libraries in" in result.stdout and "--jobs 2" in result.stdout
    assert result.stdout.count("  ok  ") == 2
