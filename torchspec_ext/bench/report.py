"""``python -m torchspec_ext.bench all``: every benchmark part in one run, written as one report.

Writes ``report.md`` (a header, then each part's table), ``report.json`` (the header and each
part's result) and PNG plots into ``--out``. A part that fails or cannot run here is reported as
such, with the reason, and the others still run.
"""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from torchspec_ext.bench.common import Report, Skipped, describe_error, device_name, resolve_device


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


def environment(device: torch.device, command: str) -> dict[str, Any]:
    return {
        "machine": f"{platform.node()} ({platform.machine()}, {platform.system()})",
        "device": f"{device.type}: {device_name(device)}",
        "cpu": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
    }


def markdown(header: dict[str, Any], results: Sequence[PartResult], plots: list[str], plot_note: str | None) -> str:
    lines = ["# torchspec_ext benchmark report", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += [""]
    lines += [r.markdown() + "\n" for r in results]
    lines += ["## plots", ""]
    lines += [plot_note] if plot_note else [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def run_all(
    parts: Sequence[str], device_choice: str, out: Path, make_runner: Callable[[str], Callable[[], Report]],
    command: str,
) -> tuple[str, dict[str, Any]]:
    """Runs ``make_runner(part)()`` for each part, in turn, and writes report.md, report.json and the plots
    into ``out``; returns the Markdown and the JSON object."""
    device = resolve_device(device_choice)  # fails fast on --device cuda without a GPU, before any part
    out.mkdir(parents=True, exist_ok=True)
    header = environment(device, command)
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
