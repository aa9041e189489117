"""PNG plots of the benchmark report (matplotlib, Agg backend): time against size per op, the
draft loss's extra memory against tokens, acceptance length against tree size."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchspec_ext.bench.common import Rows

DPI = 80  # small files: the README commits them

# part -> (x axis label of an op, the row's size on that axis).
SIZES: dict[str, tuple[Callable[[str], str], Callable[[dict], float]]] = {
    "topk": (lambda op: "logits elements N·V", lambda r: r["n"] * r["v"]),
    "draft_loss": (lambda op: "tokens N", lambda r: r["n"]),
    "tree": (lambda op: "scores B·Hq·T·S" if op == "tree_attention" else "logits B·T·V", lambda r: r["elements"]),
}
# row key -> legend label and line style of the time plots; the floor is a line without markers.
TIME_SERIES = [
    ("ours_ms", "ours", "o-"),
    ("baseline_ms", "eager", "s-"),
    ("eager_ms", "eager", "s-"),
    ("compile_ms", "torch.compile", "^-"),
    ("flashinfer_ms", "flashinfer", "d-"),  # a peer, CUDA only (see the topk and tree headers)
    ("floor_ms", "floor", "kx--"),
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _grid(plt, count: int, title: str):
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(5.5, 4.2 * cols), 3.2 * rows), squeeze=False)
    fig.suptitle(title)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path.name


def _series(ax, rows: list[dict], size: Callable[[dict], float], key: str, label: str, style: str) -> None:
    points = sorted((size(r), r[key]) for r in rows if _number(r.get(key)))
    if points:
        ax.plot([x for x, _ in points], [y for _, y in points], style, label=label, markersize=5)


def time_plot(plt, report: Rows, path: Path) -> str:
    xlabel, size = SIZES[report.name]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in report.rows:
        groups.setdefault((row.get("op", report.name), row.get("dtype", "")), []).append(row)
    fig, axes = _grid(plt, len(groups), f"{report.name}: time against size ({report.rows[0].get('device', '')})")
    for ax, ((op, dtype), rows) in zip(axes, groups.items()):
        for key, label, style in TIME_SERIES:
            _series(ax, rows, size, key, label, style)
        ax.set(title=f"{op} {dtype}", xlabel=xlabel(op), ylabel="ms", xscale="log", yscale="log")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    return _save(plt, fig, path)


def memory_plot(plt, report: Rows, path: Path) -> str:
    xlabel, size = SIZES[report.name]
    fig, axes = _grid(plt, 1, "draft_loss: extra memory against tokens (fwd + bwd)")
    _series(axes[0], report.rows, size, "ours_extra_mib", "ours", "o-")
    _series(axes[0], report.rows, size, "eager_extra_mib", "eager", "s-")
    axes[0].set(xlabel=xlabel("draft_topk_kl"), ylabel="extra MiB", xscale="log")
    axes[0].legend(fontsize=7)
    axes[0].grid(True, alpha=0.3)
    return _save(plt, fig, path)


def acceptance_plot(plt, report: Rows, path: Path) -> str:
    fig, axes = _grid(plt, 1, "acceptance length against tree size")
    ax = axes[0]
    trees = sorted((r["max_nodes"], r["acceptance_length"]) for r in report.rows if r["mode"].startswith("tree"))
    ax.plot([n for n, _ in trees], [a for _, a in trees], "o-", label="tree")
    for row in report.rows:
        if row["mode"] == "chain":
            ax.axhline(row["acceptance_length"], color="C1", linestyle="--", label=f"chain ({row['max_nodes']} nodes)")
    ax.set(xlabel="max draft nodes", ylabel="tokens per target forward", xscale="log")
    ax.set_xticks([n for n, _ in trees], [str(n) for n, _ in trees])
    ax.minorticks_off()  # the log axis's minor labels would overlap the sizes
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return _save(plt, fig, path)


def write_plots(reports: dict[str, Rows], out: Path) -> list[str]:
    """Writes the plots of the parts that ran into ``out``; the file names. Raises ImportError without matplotlib."""
    plt = _pyplot()
    files = []
    for name, report in reports.items():
        if not report.rows:
            continue
        if name in SIZES:
            files.append(time_plot(plt, report, out / f"{name}_time.png"))
        if name == "draft_loss" and any(_number(r.get("ours_extra_mib")) for r in report.rows):
            files.append(memory_plot(plt, report, out / "draft_loss_memory.png"))
        if name == "acceptance":
            files.append(acceptance_plot(plt, report, out / "acceptance.png"))
    return files
