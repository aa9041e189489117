"""Measurement helpers shared by the benchmarks: devices, timing, bandwidth, memory, the
torch.compile baseline, peers, and judging a row against its case's targets.

How results are shown and written (Report, Column, the environment header, ``all``'s
report.md/report.json) is :mod:`torchspec_ext.bench.report`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import glob
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

MiB = 1 << 20
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


@dataclass(frozen=True)
class Timing:
    repeat: int
    warmup: int
    budget_s: float | None = None  # stop after MIN_REPEAT calls once this much time is spent

    def describe(self, device: torch.device) -> str:
        how = "CUDA events" if device.type == "cuda" else "time.perf_counter"
        if self.budget_s is None:
            return f"median of {self.repeat} calls after {self.warmup} warm-up, {how}"
        return (
            f"median of {MIN_REPEAT} to {self.repeat} calls (fewer once {self.budget_s:g} s is spent) "
            f"after {self.warmup} warm-up, {how}"
        )


MIN_REPEAT = 3


def timing_for(args: Any, device: torch.device) -> Timing:
    if device.type == "cuda":
        return Timing(args.repeat or 20, 3)
    # Without --repeat, slow CPU cases take fewer samples so that the whole run stays well under a minute.
    return Timing(args.repeat, 1) if args.repeat else Timing(5, 1, budget_s=2.0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def cache_bytes(device: torch.device) -> int:
    """The GPU's L2, or the CPU's largest cache (32 MiB when sysfs does not say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=32 * MiB)


def input_set_count(bytes_per_set: int, device: torch.device) -> int:
    """How many distinct input sets to rotate among so that together they exceed twice the cache,
    so no timed call finds its input left in cache by the previous one (two at least on CUDA)."""
    n = math.ceil(2 * cache_bytes(device) / max(1, bytes_per_set))
    return max(2 if device.type == "cuda" else 1, min(64, n))


def time_ms(fn: Callable[..., Any], inputs: Sequence[tuple], device: torch.device, timing: Timing) -> float:
    """Median milliseconds of ``fn(*inputs[i % len(inputs)])`` over the timed calls after the warm-up."""
    n = len(inputs)
    for i in range(timing.warmup):
        fn(*inputs[i % n])
    synchronize(device)
    if device.type == "cuda":
        pairs = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(timing.repeat)
        ]
        for i, (start, end) in enumerate(pairs):
            start.record()
            fn(*inputs[(timing.warmup + i) % n])
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in pairs)
    times: list[float] = []
    began = time.perf_counter()
    for i in range(timing.repeat):
        t0 = time.perf_counter()
        fn(*inputs[(timing.warmup + i) % n])  # the outputs are freed inside the timed span, as in real use
        times.append((time.perf_counter() - t0) * 1e3)
        if timing.budget_s is not None and len(times) >= MIN_REPEAT and time.perf_counter() - began > timing.budget_s:
            break
    return statistics.median(times)


def time_ms_interleaved(
    fns: Sequence[Callable[..., Any]], inputs: Sequence[tuple], device: torch.device, timing: Timing
) -> list[float]:
    """Median milliseconds of each of ``fns``, timed in turns (fn 0, fn 1, ..., fn 0, ...) so that
    a load that changes during the run (a shared machine) weighs on all of them alike."""
    samples: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        for i in range(timing.warmup):
            fn(*inputs[i % len(inputs)])
    began = time.perf_counter()
    for i in range(timing.repeat):
        for fn, times in zip(fns, samples):
            synchronize(device)
            t0 = time.perf_counter()
            fn(*inputs[(timing.warmup + i) % len(inputs)])
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
        if (
            timing.budget_s is not None
            and i + 1 >= MIN_REPEAT
            and time.perf_counter() - began > timing.budget_s * len(fns)
        ):
            break
    return [statistics.median(times) for times in samples]


def read_bandwidth(device: torch.device) -> tuple[float, str]:
    """Measured memory bandwidth in bytes/s, and how it was measured."""
    nbytes = max(256 * MiB, 8 * cache_bytes(device))
    if device.type == "cuda":
        nbytes = max(nbytes, 1 << 30)
        src = torch.randn(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), [()], device, Timing(20, 3))
        return 2 * nbytes / (ms * 1e-3), f"device-to-device copy of {nbytes // MiB} MiB, bytes read + written"
    x = torch.randn(nbytes // 4)
    ms = time_ms(lambda: x.sum(), [()], device, Timing(7, 1))
    return nbytes / (ms * 1e-3), f"x.sum() over {nbytes // MiB} MiB of float32, {torch.get_num_threads()} threads"


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    return 0


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[..., Any], args: tuple, device: torch.device) -> int | None:
    """Peak memory ``fn(*args)`` takes beyond its inputs (already live) and its outputs; ``None``
    where it cannot be measured. Call it after ``fn`` has run once, so lazy set-up is not counted.

    CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``). CPU (Linux): the rise
    of the process's peak resident set (VmHWM, reset via ``/proc/self/clear_refs``) after
    ``malloc_trim`` returns freed heap pages, so it counts every page touched, BLAS scratch included,
    at page granularity (anything else the process touches meanwhile counts too).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn(*args)
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base - tensor_bytes(out))
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)  # glibc only
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = _proc_status_bytes("VmRSS")
        out = fn(*args)
        return max(0, _proc_status_bytes("VmHWM") - base - tensor_bytes(out))
    except (OSError, AttributeError):
        return None


def memory_method(device: torch.device) -> str:
    """How peak_extra_bytes measures on this device, for report headers."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated minus inputs and outputs"
    return "rise of peak RSS (VmHWM reset, after malloc_trim) minus outputs"


class Rows(Protocol):
    """What a part's results are to the measuring code: a name and rows (a Report is one)."""

    name: str
    rows: list[dict]


def run_cases(
    report: Rows,
    cases: Sequence[Any],
    run_one: Callable[[Any], dict],
    label: Callable[[Any], str],
    device: torch.device,
) -> Rows:
    """Appends run_one(case) to report.rows for each case (progress on stderr), freeing memory between cases."""
    for case in cases:
        print(f"[bench {report.name}] {label(case)}", file=sys.stderr, flush=True)
        report.rows.append(run_one(case))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters), for a report cell or header."""
    lines = str(exc).strip().splitlines()
    return (f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)[:300]


class Skipped(Exception):
    """Raised by a benchmark's run() when it cannot run here for a reason that is not a failure
    (e.g. no trained draft to measure); the message says how to make it run."""


def time_compiled(
    reference_fn: Callable[..., Any],
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    inputs: Sequence[tuple],
    device: torch.device,
    timing: Timing,
    ours_ms: float,
) -> dict[str, Any]:
    """The ``torch.compile`` baseline: times ``wrap(torch.compile(reference_fn))`` like ``time_ms``,
    after a first call that compiles (its seconds reported apart). fullgraph first, then with
    graph breaks (the top-k reference branches on the data); where both fail, the cells say "failed"
    and why, and the benchmark goes on."""
    error: Exception | None = None
    for fullgraph in (True, False):
        torch._dynamo.reset()  # a fresh cache: the recompile limit counts per function across cases
        try:
            fn = wrap(torch.compile(reference_fn, fullgraph=fullgraph, dynamic=False))
            began = time.perf_counter()
            fn(*inputs[0])
            synchronize(device)
            compile_s = time.perf_counter() - began
            compile_ms = time_ms(fn, inputs, device, timing)
        except Exception as exc:  # no C++ compiler, an unsupported op, ...: any compile failure
            error = exc
            continue
        return {
            "compile_ms": compile_ms,
            "ours_over_compile": ours_ms / compile_ms,
            "compile_s": compile_s,
            "compile_graph": "full graph" if fullgraph else "graph breaks",
        }
    return {"compile_ms": "failed", "ours_over_compile": "failed", "compile_error": describe_error(error)}


def peers_can_run(device: torch.device) -> bool:
    """Whether the GPU-only peer libraries (flashinfer) can run on ``device``: CUDA only. Its own
    function so that a test can let a fake peer run on a CPU."""
    return device.type == "cuda"


def import_flashinfer(device: torch.device) -> tuple[Any | None, str]:
    """The flashinfer module where it imports and can run on ``device`` (else None), and a few
    words for the report header: its version, or why the peer did not run."""
    if not peers_can_run(device):
        return None, f"did not run: needs CUDA (this run is on {device.type})"
    try:
        import flashinfer
    except Exception as exc:  # absent, or a build that does not match this torch / CUDA
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "flashinfer"
        why = "not installed" if missing else f"import failed ({describe_error(exc)})"
        return None, f"did not run: {why}; `pip install flashinfer-python` adds it"
    return flashinfer, f"flashinfer {getattr(flashinfer, '__version__', '(version unknown)')}"


def peer_result(name: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()``: another library's time (``name + "_ms"``) and what else it reports. Where it
    raises (a peer's bug, an unsupported case, an API that changed between versions), the cell says
    "failed" and ``name + "_error"`` why, and the benchmark goes on."""
    try:
        return measure()
    except Exception as exc:
        return {f"{name}_ms": "failed", f"{name}_error": describe_error(exc)}


@dataclass(frozen=True)
class Goal:
    """One target of a benchmark case: its words in the target column, when a row misses it, and
    the name a MISS lists it by (none: a plain "MISS", for a row with this one target)."""

    text: str
    missed_if: Callable[[dict[str, Any]], bool]
    name: str | None = None


def target(goals: Sequence[Goal]) -> str | None:
    """The target cell: the goals' words, or None where the case has none."""
    return ", ".join(goal.text for goal in goals) or None


def verdict(goals: Sequence[Goal], row: dict[str, Any], wrong: str | None = None) -> str | None:
    """The result cell: ``wrong`` where the output was wrong (its words: "WRONG ..."), else None
    without goals, else PASS, or MISS with the names of the goals that ``row`` missed."""
    if wrong is not None:
        return wrong
    if not goals:
        return None
    missed = [goal for goal in goals if goal.missed_if(row)]
    if not missed:
        return "PASS"
    names = ", ".join(goal.name for goal in missed if goal.name)
    return f"MISS ({names})" if names else "MISS"
