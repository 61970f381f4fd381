"""One PNG per loss from benchmark rows: time and peak memory against problem size, one line per
implementation (kdloss, eager, torch.compile, peers) and case kind. Needs matplotlib (the ``bench``
extra: ``pip install 'kdloss[bench]'``); without it no plot is written and the reason is printed."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

#: one colour per implementation, so that every loss's plot reads the same way
COLOURS = {"kdloss": "tab:red", "kdloss-unfused": "tab:orange", "eager": "tab:blue", "compile": "tab:green"}
PEER_COLOURS = ["tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
LINESTYLES = ["-", "--", ":", "-."]


def _series(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Rows grouped by (case, dtype, backend), each group ordered by problem size."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["case"], row["dtype"], row["backend"])].append(row)
    return {key: sorted(group, key=lambda r: float(r["elements"])) for key, group in sorted(groups.items())}


def plot_loss(loss: str, rows: list[dict], path: Path, title: str = "") -> Path:
    """Writes the plot of one loss's rows to ``path`` (PNG) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    kinds = sorted({(r["case"], r["dtype"]) for r in rows})
    peers = sorted({r["backend"] for r in rows} - set(COLOURS))
    for (case, dtype, backend), group in _series(rows).items():
        style = LINESTYLES[kinds.index((case, dtype)) % len(LINESTYLES)]
        colour = COLOURS.get(backend) or PEER_COLOURS[peers.index(backend) % len(PEER_COLOURS)]
        label = f"{backend} — {case} {dtype}"
        sizes = [float(r["elements"]) for r in group]
        ax_time.plot(sizes, [float(r["median_ms"]) for r in group], style, marker="o", color=colour, label=label)
        ax_mem.plot(sizes, [max(float(r["peak_mib"]), 1e-3) for r in group], style, marker="o", color=colour,
                    label=label)
    for ax, ylabel in ((ax_time, "forward + backward, median ms"), (ax_mem, "peak extra memory, MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("problem size (elements of the differentiable inputs)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.legend(fontsize=7, loc="best")
    fig.suptitle(f"{loss}: kdloss vs eager vs torch.compile" + (f" — {title}" if title else ""), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_losses(rows: list[dict], out: Path, title: str = "") -> list[Path]:
    """One ``<loss>.png`` per loss in ``rows`` under ``out``; [] (with a message) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("kdloss.bench: no plots: matplotlib is not installed (pip install 'kdloss[bench]')", file=sys.stderr)
        return []
    by_loss: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_loss[row["loss"]].append(row)
    return [plot_loss(loss, group, out / f"{loss}.png", title) for loss, group in sorted(by_loss.items())]
