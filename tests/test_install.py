"""The user install of the README, as a user runs it: build the wheel from the sources, install it with
--no-deps into a fresh virtual environment that sees the torch already installed, and use a kernel
from outside the checkout (the JIT build finds its sources in the wheel; the kernel cache this test
session built is shared, so nothing is compiled again)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import torch

from kdloss import _build

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "kdloss", "csrc"]


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    # without PYTHONPATH: a checkout on it would be taken for an installed kdloss
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_installs_next_to_existing_torch_and_runs_a_kernel(tmp_path, monkeypatch):
    _build.require("margin_mse", "cpu")  # the session's cache holds the library the wheel will reuse
    src = tmp_path / "src"  # a copy, so that building leaves the checkout untouched
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, src / name, *([shutil.ignore_patterns("__pycache__")] if (ROOT / name).is_dir() else []))
    dist = tmp_path / "dist"
    # --no-build-isolation: the build backend (setuptools) from this environment, so no download
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(dist)])
    (wheel,) = dist.glob("kdloss-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)])
    # the torch a user already has: this environment's site-packages, after the venv's own (added after
    # the install, so that pip does not take this environment's development kdloss for the wheel's)
    (site / "existing_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    check = textwrap.dedent(
        """
        import sys, torch, kdloss
        from kdloss import _build
        from kdloss.functional import margin_mse_loss
        assert kdloss.__file__.startswith(sys.prefix), kdloss.__file__
        assert str(_build.csrc_dir()).startswith(sys.prefix), _build.csrc_dir()
        pos, neg, t = torch.randn(4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3)
        out = margin_mse_loss(pos, neg, t, backend="kernel")
        expected = ((pos[:, None] - neg - (t[:, :1] - t[:, 1:])) ** 2).mean()
        torch.testing.assert_close(out, expected)
        print("OK", torch.__version__)
        """
    )
    monkeypatch.setenv("KDLOSS_CACHE_DIR", str(_build.cache_dir()))
    result = _run([str(python), "-c", check], cwd=tmp_path)
    assert f"OK {torch.__version__}" in result.stdout
    assert "compiling" not in result.stderr  # the library built for the checkout serves the wheel too
