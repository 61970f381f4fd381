"""The registry is the one list of losses: every file of the one-name-per-loss layout exists for each
entry, everything that lists losses agrees with it, the kernel path never imports the references, and the
public API is documented."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kdloss
from kdloss import _build, _registry

ROOT = Path(__file__).resolve().parent.parent
LOSSES = _registry.LOSSES
IDS = [loss.name for loss in LOSSES]


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_each_loss_has_its_files(loss):
    name = loss.name
    module = importlib.import_module(f"kdloss.{name}")
    for symbol in (*loss.functionals, *loss.modules):
        assert hasattr(module, symbol), f"kdloss/{name}.py must define {symbol}"
    assert (ROOT / "tests" / f"test_{name}.py").is_file()
    assert (ROOT / loss.docs).is_file()
    assert (ROOT / "kdloss" / "_ops" / f"{name}.py").is_file() == loss.ops
    assert (ROOT / "kdloss" / "testing" / f"{name}.py").is_file() == loss.fuzz
    assert (ROOT / "kdloss" / "bench" / f"{name}.py").is_file() == loss.bench
    for relative in (*loss.cpu_sources, *loss.cuda_sources):
        assert (ROOT / "csrc" / relative).is_file(), relative
        assert Path(relative).stem.removesuffix("_ops") == name, "sources carry the loss's name"
    for library in loss.kernels:
        assert library in _registry.kernel_libraries()


def test_every_source_file_belongs_to_one_loss():
    listed = {relative for loss in LOSSES for relative in (*loss.cpu_sources, *loss.cuda_sources)}
    on_disk = {str(p.relative_to(ROOT / "csrc")) for folder in ("cpu", "cuda")
               for p in (ROOT / "csrc" / folder).iterdir() if p.suffix in (".cpp", ".cu")}
    assert on_disk == listed
    assert [p.name for p in _build.sources("topk_kl", "cuda")] == ["topk_kl.cu", "topk_kl_ops.cpp"]


def test_exports_derive_from_the_registry():
    expected = {name for loss in LOSSES for name in (*loss.functionals, *loss.modules)}
    base = {"KernelUnavailableError", "__version__", "distributed", "empty_cache", "functional", "reference", "sparse"}
    assert set(kdloss.__all__) == expected | base
    assert set(kdloss.functional.__all__) == {name for loss in LOSSES for name in loss.functionals}
    assert kdloss.__all__ == sorted(kdloss.__all__)
    ops = {op for op in dir(kdloss._ops) if not op.startswith("_")}
    assert {loss.name for loss in LOSSES if loss.ops} <= ops


def test_cli_choices_come_from_the_registry():
    from kdloss import bench, testing

    assert set(bench.LOSSES) == {loss.name for loss in LOSSES if loss.bench}
    assert set(testing.names()) == {loss.name for loss in LOSSES if loss.fuzz}
    assert _registry.kernel_test_files() == [f"tests/test_{loss.name}.py" for loss in LOSSES if loss.has_kernel]
    with pytest.raises(ValueError, match="loss must be one of"):
        _registry.get("trg_graph")


def _table_rows(text: str) -> list[str]:
    block = text.split("<!-- losses:begin -->")[1].split("<!-- losses:end -->")[0]
    return [line for line in block.splitlines() if line.startswith("| `")]


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_loss_tables_match_the_registry(page):
    rows = _table_rows((ROOT / page).read_text())
    assert [re.match(r"\| `(\w+)`", row).group(1) for row in rows] == [loss.name for loss in LOSSES]
    for row, loss in zip(rows, LOSSES, strict=True):
        for symbol in (*loss.functionals, *loss.modules):
            assert f"`{symbol}`" in row, f"{page}: {loss.name} row must name {symbol}"


def test_the_kernel_path_never_imports_the_references():
    code = ("import sys, torch, kdloss\n"
            "from kdloss import functional as F\n"
            "x = torch.randn(4, 10, requires_grad=True); top = torch.randn(4, 10).topk(3)\n"
            "F.topk_kl_loss(x, top.indices, top.values.log_softmax(-1), backend='kernel').backward()\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('kdloss.reference'))\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def _public_symbols():
    for name in kdloss.__all__:
        value = getattr(kdloss, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            yield name, value


@pytest.mark.parametrize("name", [name for name, _ in _public_symbols()])
def test_public_symbols_are_documented(name):
    doc = inspect.getdoc(getattr(kdloss, name)) or ""
    if name == "KernelUnavailableError":
        assert doc
        return
    for section in ("Args:", "Example:"):
        assert section in doc, f"{name} docstring lacks {section}"
    assert "Shape" in doc or "Returns:" in doc


def test_public_text_cites_no_internal_document():
    pattern = re.compile(r"spec §|§\d|decision \d|ASSUMPTION")
    offenders = [str(p.relative_to(ROOT)) for folder in ("kdloss", "docs") for p in (ROOT / folder).rglob("*")
                 if p.suffix in (".py", ".md") and pattern.search(p.read_text())]
    offenders += ["README.md"] if pattern.search((ROOT / "README.md").read_text()) else []
    assert not offenders


@pytest.mark.parametrize("name", [name for name, _ in _public_symbols()])
def test_public_examples_run(name):
    import doctest

    value = getattr(kdloss, name)
    module = sys.modules[value.__module__]
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(value, name, module=module, globs=dict(vars(module))):
        runner.run(test)
    assert runner.failures == 0, f"the Example of {name} does not run as written"
