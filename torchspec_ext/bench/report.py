"""The benchmark report: a part's :class:`Report` (header and table), its columns and cell
formats, the environment header every report starts with, and ``python -m torchspec_ext.bench
all``, which runs every part in turn and writes them as one report.

``all`` writes ``report.md`` (a header, then each part's table), ``report.json`` (the header and each
part's result) and PNG plots into ``--out``. A part that fails or cannot run here is reported as
such, with the reason, and the others still run.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchspec_ext.bench.common import MiB, Skipped, cache_bytes, describe_error, device_name, resolve_device


def fmt_num(digits: int = 3) -> Callable[[Any], str]:
    """``digits`` significant digits without an exponent (1234.5 -> "1235", 0.01234 -> "0.0123")."""

    def fmt(v: float | str) -> str:
        if isinstance(v, str):  # a cell that says why there is no number ("failed")
            return v
        magnitude = math.floor(math.log10(abs(v))) if v and math.isfinite(v) else 0
        return f"{v:.{max(0, digits - 1 - magnitude)}f}"

    return fmt


def fmt_fixed(decimals: int, suffix: str = "") -> Callable[[Any], str]:
    return lambda v: v if isinstance(v, str) else f"{v:.{decimals}f}{suffix}"


def fmt_percent(decimals: int) -> Callable[[Any], str]:
    return lambda v: f"{v:.{decimals}%}"


@dataclass
class Column:
    """A table column: the row key it shows, its title, and how a value is written."""

    key: str
    title: str
    fmt: Callable[[Any], str] = str


COMPILE_COLUMNS = [
    Column("compile_ms", "compile ms", fmt_num()),
    Column("ours_over_compile", "ours/compile", fmt_fixed(2, "x")),
]
COMPILE_NOTE = (
    "torch.compile of torchspec_ext.reference (fullgraph where it traces, dynamic=False), the compiling "
    "first call not timed; only some cases (— elsewhere: inductor compiles slowly on a CPU)"
)
# The cells that common.target and common.verdict fill, last in a part's table.
TARGET_COLUMNS = [Column("target", "target"), Column("result", "result")]


@dataclass
class Report:
    """One part's result: a header (settings and machine) above a table of its rows."""

    name: str
    header: dict[str, Any]  # shown as a list above the table and stored as is in the JSON
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.name}", ""]
        lines += [f"- {key}: {value}" for key, value in self.header.items()]
        lines += ["", "| " + " | ".join(c.title for c in self.columns) + " |"]
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            cells = ["—" if row.get(c.key) is None else c.fmt(row[c.key]) for c in self.columns]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.name, "header": self.header, "rows": self.rows}


def environment_header(
    device: torch.device,
    timing: str | None = None,
    bandwidth: tuple[float, str] | None = None,
    threads: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """The header's lines about the machine, the same in every report: the device and torch; the
    threads (``threads=False`` where the part sets its own, as the pipeline's processes do); with
    ``bandwidth`` (read_bandwidth's bytes/s and method) the cache and the bandwidth; with ``timing``
    how times were taken; with ``command`` (the ``all`` report) the host, CPU, Python, date and command."""
    whole_run = command is not None
    lines = {
        "machine": f"{platform.node()} ({platform.machine()}, {platform.system()})" if whole_run else None,
        "device": f"{device.type}: {device_name(device)}",
        "cpu": device_name(torch.device("cpu")) if whole_run else None,
        "torch": torch.__version__,
        "python": platform.python_version() if whole_run else None,
        "threads": torch.get_num_threads() if threads else None,
        "cache MiB": cache_bytes(device) // MiB if bandwidth else None,
        "read bandwidth GB/s": round(bandwidth[0] / 1e9, 2) if bandwidth else None,
        "bandwidth measured by": bandwidth[1] if bandwidth else None,
        "timing": timing,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if whole_run else None,
        "command": command,
    }
    return {key: value for key, value in lines.items() if value is not None}


@dataclass
class PartResult:
    name: str
    status: str  # "ok", "failed" or "skipped"
    seconds: float
    report: Report | None = None
    reason: str | None = None

    def markdown(self) -> str:
        if self.report is not None:
            return f"{self.report.markdown()}\n\n({self.seconds:.0f} s)"
        return f"## {self.name}\n\n**{self.status}** after {self.seconds:.0f} s: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        result: dict[str, Any] = {"status": self.status, "seconds": round(self.seconds, 1)}
        if self.reason is not None:
            result["reason"] = self.reason
        if self.report is not None:
            result |= self.report.to_json()
        return result


def run_part(name: str, run: Callable[[], Report]) -> PartResult:
    """``run()``, with a failure (exception or SystemExit) or a Skipped turned into the part's result."""
    print(f"[bench all] {name} ...", file=sys.stderr, flush=True)
    began = time.perf_counter()
    try:
        report = run()
    except Skipped as exc:
        return PartResult(name, "skipped", time.perf_counter() - began, reason=str(exc))
    except (Exception, SystemExit) as exc:  # SystemExit: the parts' own clear errors (e.g. a bad --draft)
        traceback.print_exc(file=sys.stderr)
        return PartResult(name, "failed", time.perf_counter() - began, reason=describe_error(exc))
    return PartResult(name, "ok", time.perf_counter() - began, report=report)


def markdown(header: dict[str, Any], results: Sequence[PartResult], plots: list[str], plot_note: str | None) -> str:
    lines = ["# torchspec_ext benchmark report", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += [""]
    lines += [r.markdown() + "\n" for r in results]
    lines += ["## plots", ""]
    lines += [plot_note] if plot_note else [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def run_all(
    parts: Sequence[str],
    device_choice: str,
    out: Path,
    make_runner: Callable[[str], Callable[[], Report]],
    command: str,
) -> tuple[str, dict[str, Any]]:
    """Runs ``make_runner(part)()`` for each part, in turn, and writes report.md, report.json and the plots
    into ``out``; returns the Markdown and the JSON object."""
    device = resolve_device(device_choice)  # fails fast on --device cuda without a GPU, before any part
    out.mkdir(parents=True, exist_ok=True)
    header = environment_header(device, command=command)
    began = time.perf_counter()
    results = [run_part(name, make_runner(name)) for name in parts]
    header["total seconds"] = round(time.perf_counter() - began)

    plots: list[str] = []
    plot_note = None
    try:
        from torchspec_ext.bench.plots import write_plots

        plots = write_plots({r.name: r.report for r in results if r.report is not None}, out)
    except ImportError as exc:
        plot_note = f"No plots: matplotlib is missing ({exc}); `pip install 'torchspec_ext[bench]'` adds it."
    except Exception as exc:  # a plot's bug must not lose the measurements
        traceback.print_exc(file=sys.stderr)
        plot_note = f"No plots: plotting failed ({type(exc).__name__}: {exc})"

    text = markdown(header, results, plots, plot_note)
    data = {"header": header, "parts": {r.name: r.to_json() for r in results}, "plots": plots}
    if plot_note:
        data["plots_note"] = plot_note
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str))
    return text, data


def command_line(argv: Sequence[str]) -> str:
    return "python -m torchspec_ext.bench " + shlex.join(argv)
