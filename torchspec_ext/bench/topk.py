"""``topk_logprobs`` and ``linear_topk_logprobs`` against eager torch, in the same run.

Baseline: ``torch.topk`` then ``torch.logsumexp`` of the float32 logits and the subtraction; for
the linear op ``hidden @ weight.T`` first, and the GEMM alone is timed too (the GPU target is
within 1.15x of it). Bandwidth columns count the bytes of logits read; they are left blank for
the linear op, whose logits are made tile by tile in cache and never read from memory.

Peer, on CUDA where it imports: flashinfer's ``top_k`` on the same logits (``topk_logprobs``
rows), see ``FLASHINFER_NOTE``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchspec_ext import reference
from torchspec_ext.bench.common import (
    DTYPE_NAMES,
    Goal,
    MiB,
    Timing,
    import_flashinfer,
    input_set_count,
    memory_method,
    peak_extra_bytes,
    peer_result,
    read_bandwidth,
    resolve_device,
    run_cases,
    target,
    time_compiled,
    time_ms,
    timing_for,
    verdict,
)
from torchspec_ext.bench.report import (
    COMPILE_COLUMNS,
    COMPILE_NOTE,
    TARGET_COLUMNS,
    Column,
    Report,
    environment_header,
    fmt_fixed,
    fmt_num,
    fmt_percent,
)
from torchspec_ext.ops import linear_topk_logprobs, topk_logprobs

TOPK, LINEAR = "topk_logprobs", "linear_topk_logprobs"

FLASHINFER_NOTE = (
    "flashinfer.top_k(logits, k, sorted=True) on the topk_logprobs rows' logits: the k largest logits "
    "(input dtype) and their int64 indices per row, sorted descending as ours are. It selects only: no "
    "log-sum-exp, log-probabilities or temperature, which ours computes in the same read. Its values are "
    "checked against torch.topk's (flashinfer_max_error in the JSON). Not on the linear op, whose logits "
    "are never materialised"
)


@dataclass(frozen=True)
class Case:
    op: str
    n: int
    v: int
    k: int
    dtype: torch.dtype
    h: int | None = None  # hidden size, linear op only
    temperature: float = 1.0
    compile: bool = False  # also time the torch.compile baseline
    # Targets, None where the case has none.
    min_speedup: float | None = None
    min_bandwidth_fraction: float | None = None  # of the measured read bandwidth
    max_gemm_ratio: float | None = None  # ours / GEMM alone
    max_extra_fraction: float | None = None  # extra memory / full [N, V] logits

    @property
    def logits_bytes(self) -> int:
        return self.n * self.v * torch.empty((), dtype=self.dtype).element_size()

    @property
    def shape(self) -> str:
        h = f" H={self.h}" if self.op == LINEAR else ""
        return f"N={self.n}{h} V={self.v} k={self.k}"

    def goals(self) -> list[Goal]:
        goals = []
        if self.min_bandwidth_fraction is not None:
            goals.append(
                Goal(
                    f"BW ≥ {self.min_bandwidth_fraction:.0%} of measured",
                    lambda row: row["ours_over_floor"] > 1 / self.min_bandwidth_fraction,
                    "BW",
                )
            )
        if self.min_speedup is not None:
            goals.append(
                Goal(f"speed-up ≥ {self.min_speedup:g}x", lambda row: row["speedup"] < self.min_speedup, "speed-up")
            )
        if self.max_gemm_ratio is not None:
            goals.append(
                Goal(
                    f"≤ {self.max_gemm_ratio:g}x GEMM", lambda row: row["ours_over_gemm"] > self.max_gemm_ratio, "GEMM"
                )
            )
        if self.max_extra_fraction is not None:
            goals.append(
                Goal(
                    f"extra mem < {self.max_extra_fraction:.0%} of logits",
                    lambda row: not row.get("ours_extra_fraction", 1.0) < self.max_extra_fraction,
                    "memory",
                )
            )
        return goals


def default_cases(device: torch.device, quick: bool) -> list[Case]:
    f32, bf16 = torch.float32, torch.bfloat16
    if device.type == "cuda":
        if quick:
            return [Case(TOPK, 1024, 32768, 64, bf16, compile=True), Case(LINEAR, 1024, 32768, 64, bf16, h=1024)]
        return [
            Case(TOPK, 2048, 152064, 64, bf16),
            Case(TOPK, 8192, 152064, 64, bf16, min_bandwidth_fraction=0.85, min_speedup=4.0, compile=True),
            Case(LINEAR, 2048, 152064, 64, bf16, h=4096),
            Case(LINEAR, 8192, 152064, 64, bf16, h=4096, max_gemm_ratio=1.15, max_extra_fraction=0.05, compile=True),
        ]
    if quick:
        return [
            Case(TOPK, 64, 8192, 64, f32),
            Case(TOPK, 256, 8192, 64, f32, compile=True),
            Case(TOPK, 256, 8192, 64, bf16),
            Case(LINEAR, 256, 8192, 64, f32, h=128),
        ]
    return [
        Case(TOPK, 512, 49152, 64, f32),
        Case(TOPK, 2048, 49152, 64, f32, min_speedup=1.5, compile=True),
        Case(TOPK, 2048, 49152, 64, bf16),
        Case(LINEAR, 512, 49152, 64, f32, h=576),
        Case(LINEAR, 2048, 49152, 64, f32, h=576, compile=True),
    ]


def eager_topk_logprobs(logits: torch.Tensor, k: int, temperature: float):
    values, indices = torch.topk(logits, k)
    # At T = 1 the division is skipped (an extra [N, V] pass), so the baseline is the fastest eager form.
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    lse = torch.logsumexp(scaled, -1)
    return values.float() / temperature - lse.unsqueeze(-1), indices, lse


def make_inputs(case: Case, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    if case.op == TOPK:
        return (torch.randn(case.n, case.v, device=device, dtype=case.dtype, generator=gen),)
    hidden = torch.randn(case.n, case.h, device=device, dtype=case.dtype, generator=gen)
    # Scaled so that the logits are O(1), as from a trained LM head.
    weight = torch.randn(case.v, case.h, device=device, dtype=case.dtype, generator=gen) * case.h**-0.5
    return hidden, weight


def max_error(ours, reference) -> float:
    """Largest difference of the log-probabilities or the log-sum-exp (values, not indices, which ties may swap)."""
    return max((ours[i].float() - reference[i].float()).abs().max().item() for i in (0, 2))


def flashinfer_peer(flashinfer: Any, sets: list[tuple], k: int, device: torch.device, timing: Timing) -> dict[str, Any]:
    """flashinfer's top-k selection on the same logits: its time, and its values' largest difference
    from torch.topk's on the first set (0 where it selects the same entries)."""
    select = lambda logits: flashinfer.top_k(logits, k, sorted=True)
    logits = sets[0][0]
    values, _ = select(logits)
    error = (values.float() - torch.topk(logits, k).values.float()).abs().max().item()
    return {"flashinfer_ms": time_ms(select, sets, device, timing), "flashinfer_max_error": error}


def run_case(
    case: Case, device: torch.device, timing: Timing, bandwidth: float, flashinfer: Any = None
) -> dict[str, Any]:
    k, t = case.k, case.temperature
    gen = torch.Generator(device=device).manual_seed(0)
    first = make_inputs(case, device, gen)
    count = input_set_count(sum(x.nbytes for x in first), device)
    sets = [first] + [make_inputs(case, device, gen) for _ in range(count - 1)]

    gemm: Callable[..., Any] | None = None
    if case.op == TOPK:
        ours = lambda x: topk_logprobs(x, k, t)
        baseline = lambda x: eager_topk_logprobs(x, k, t)
        compiled = lambda fn: lambda x: fn(x, k, t)
    else:
        ours = lambda h, w: linear_topk_logprobs(h, w, k, t)
        baseline = lambda h, w: eager_topk_logprobs(h @ w.T, k, t)
        compiled = lambda fn: lambda h, w: fn(h, w, k, t)
        gemm = lambda h, w: h @ w.T

    error = max_error(ours(*first), baseline(*first))
    # Half-precision linear logits round differently when the GEMM is tiled; elsewhere only float32 sums differ.
    tolerance = 0.1 if case.op == LINEAR and case.dtype != torch.float32 else 1e-3
    ours_ms = time_ms(ours, sets, device, timing)
    baseline_ms = time_ms(baseline, sets, device, timing)
    row: dict[str, Any] = {
        "op": case.op,
        "device": device.type,
        "dtype": DTYPE_NAMES[case.dtype],
        "shape": case.shape,
        "n": case.n,
        "h": case.h,
        "v": case.v,
        "k": case.k,
        "temperature": t,
        "ours_ms": ours_ms,
        "baseline_ms": baseline_ms,
        "speedup": baseline_ms / ours_ms,
        "max_abs_error": error,
        "target": target(case.goals()),
    }
    if case.compile:
        row.update(time_compiled(getattr(reference, case.op), compiled, sets, device, timing, ours_ms))
    if case.op == TOPK:
        floor_ms = case.logits_bytes / bandwidth * 1e3
        row.update(ours_gbps=case.logits_bytes / ours_ms / 1e6, floor_ms=floor_ms, ours_over_floor=ours_ms / floor_ms)
        if flashinfer is not None:
            row.update(peer_result("flashinfer", lambda: flashinfer_peer(flashinfer, sets, k, device, timing)))
    else:
        gemm_ms = time_ms(gemm, sets, device, timing)
        ours_extra = peak_extra_bytes(ours, first, device)
        baseline_extra = peak_extra_bytes(baseline, first, device)
        row.update(gemm_ms=gemm_ms, ours_over_gemm=ours_ms / gemm_ms)
        if ours_extra is not None and baseline_extra is not None:
            row.update(
                ours_extra_mib=ours_extra / MiB,
                baseline_extra_mib=baseline_extra / MiB,
                ours_extra_fraction=ours_extra / case.logits_bytes,
            )
    row["result"] = verdict(case.goals(), row, None if error <= tolerance else f"WRONG (max err {error:.2g})")
    return row


COLUMNS = [
    Column("op", "op"),
    Column("device", "device"),
    Column("dtype", "dtype"),
    Column("shape", "shape"),
    Column("ours_ms", "ours ms", fmt_num()),
    Column("baseline_ms", "baseline ms", fmt_num()),
    Column("speedup", "speed-up", fmt_fixed(2, "x")),
    *COMPILE_COLUMNS,
    Column("ours_gbps", "ours GB/s", fmt_num()),
    Column("floor_ms", "floor ms", fmt_num()),
    Column("ours_over_floor", "ours/floor", fmt_fixed(2)),
    Column("flashinfer_ms", "flashinfer top_k ms", fmt_num()),
    Column("gemm_ms", "GEMM ms", fmt_num()),
    Column("ours_over_gemm", "ours/GEMM", fmt_fixed(2)),
    Column("ours_extra_mib", "ours extra MiB", fmt_fixed(1)),
    Column("baseline_extra_mib", "baseline extra MiB", fmt_fixed(1)),
    Column("ours_extra_fraction", "ours extra / logits", fmt_percent(2)),
    *TARGET_COLUMNS,
]


def run(args: Any) -> Report:
    device = resolve_device(args.device)
    timing = timing_for(args, device)
    bandwidth, how = read_bandwidth(device)
    flashinfer, flashinfer_status = import_flashinfer(device)
    header = environment_header(device, timing.describe(device), (bandwidth, how)) | {
        "extra memory": memory_method(device) + "; linear op only",
        "compile": COMPILE_NOTE,
        "peer": f"{flashinfer_status}. {FLASHINFER_NOTE}",
        "sizes": "quick (targets not checked)" if args.quick else "default",
    }
    return run_cases(
        Report("topk", header, COLUMNS),
        default_cases(device, args.quick),
        lambda case: run_case(case, device, timing, bandwidth, flashinfer),
        lambda case: f"{case.op} {DTYPE_NAMES[case.dtype]} {case.shape}",
        device,
    )
