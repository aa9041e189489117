"""``small_rows_linear`` against the two BLAS ways of the same product, in the same run, on the CPU.

A decoding step multiplies a few rows (1 for plain decoding, 2 to 17 for a verification forward here)
by every weight, so its floor is reading the weight once: weight bytes / the measured read bandwidth.
The baselines are what PyTorch runs for ``nn.Linear`` (``x @ W.T``) and ``(W @ x.T).T`` (one row
padded to two), the other BLAS path ``torchspec_ext.small_rows`` measures. Each timed call reads a
weight that is not in cache (the inputs rotate over copies that outgrow it), as in a forward.
The shapes are the default target's (SmolLM2-135M: hidden 576, MLP 1536, vocabulary 49152).

On CUDA the op is ``torch.nn.functional.linear`` (cuBLAS), so there is nothing of ours to time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from torchspec_ext.bench.common import (
    DTYPE_NAMES,
    Goal,
    input_set_count,
    read_bandwidth,
    resolve_device,
    run_cases,
    target,
    time_ms_interleaved,
    timing_for,
    verdict,
)
from torchspec_ext.bench.report import TARGET_COLUMNS, Column, Report, environment_header, fmt_fixed, fmt_num
from torchspec_ext.ops import small_rows_linear
from torchspec_ext.small_rows import _swapped


@dataclass(frozen=True)
class Case:
    name: str  # which weight of the default target the shape is
    rows: int
    out_features: int
    in_features: int
    dtype: torch.dtype
    max_floor_ratio: float | None = None  # target: ours within this factor of the read floor

    @property
    def weight_bytes(self) -> int:
        return self.out_features * self.in_features * torch.empty((), dtype=self.dtype).element_size()

    @property
    def shape(self) -> str:
        return f"rows={self.rows} W=[{self.out_features}, {self.in_features}]"

    def goals(self) -> list[Goal]:
        if self.max_floor_ratio is None:
            return []
        ratio = self.max_floor_ratio
        return [Goal(f"≤ {ratio:g}x the read floor", lambda row: row["ours_over_floor"] > ratio, "floor")]


def default_cases(quick: bool) -> list[Case]:
    f32, bf16 = torch.float32, torch.bfloat16
    if quick:
        return [Case("mlp up", 1, 1536, 576, f32), Case("mlp down", 5, 576, 1536, bf16)]
    lm_head, up, down = ("LM head", 49152, 576), ("mlp up", 1536, 576), ("mlp down", 576, 1536)
    return [
        *(Case(*lm_head[:1], rows, *lm_head[1:], f32, max_floor_ratio=1.5) for rows in (1, 2, 5, 8)),
        Case(*lm_head[:1], 17, *lm_head[1:], f32),
        *(Case(*lm_head[:1], rows, *lm_head[1:], bf16) for rows in (1, 5)),
        *(Case(*up[:1], rows, *up[1:], f32) for rows in (1, 5)),
        *(Case(*down[:1], rows, *down[1:], f32) for rows in (1, 5)),
    ]


def run_case(case: Case, device: torch.device, timing: Any, bandwidth: float) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(case.rows)

    def inputs() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(case.rows, case.in_features, generator=gen).to(case.dtype)
        w = (torch.randn(case.out_features, case.in_features, generator=gen) * case.in_features**-0.5).to(case.dtype)
        return x, w

    first = inputs()
    sets = [first] + [inputs() for _ in range(input_set_count(case.weight_bytes, device) - 1)]
    ours = lambda x, w: small_rows_linear(x, w)
    usual = lambda x, w: torch.nn.functional.linear(x, w)
    swapped = lambda x, w: _swapped(w, x)
    want = first[0].double() @ first[1].double().T
    error = (ours(*first).double() - want).abs().max().item()
    # float32 sums of in_features terms; a bfloat16 result is rounded once more (relative 2^-9).
    tolerance = 1e-4 if case.dtype == torch.float32 else 2**-8 * want.abs().max().item() + 1e-4
    ours_ms, usual_ms, swapped_ms = time_ms_interleaved([ours, usual, swapped], sets, device, timing)
    floor_ms = case.weight_bytes / bandwidth * 1e3
    row: dict[str, Any] = {
        "weight": case.name,
        "dtype": DTYPE_NAMES[case.dtype],
        "shape": case.shape,
        "rows": case.rows,
        "ours_ms": ours_ms,
        "usual_ms": usual_ms,
        "swapped_ms": swapped_ms,
        "speedup": min(usual_ms, swapped_ms) / ours_ms,
        "ours_gbps": case.weight_bytes / ours_ms / 1e6,
        "floor_ms": floor_ms,
        "ours_over_floor": ours_ms / floor_ms,
        "max_abs_error": error,
        "target": target(case.goals()),
    }
    row["result"] = verdict(case.goals(), row, None if error <= tolerance else f"WRONG (max err {error:.2g})")
    return row


COLUMNS = [
    Column("weight", "weight"),
    Column("dtype", "dtype"),
    Column("shape", "shape"),
    Column("ours_ms", "ours ms", fmt_num()),
    Column("usual_ms", "x @ W.T ms", fmt_num()),
    Column("swapped_ms", "(W @ x.T).T ms", fmt_num()),
    Column("speedup", "speed-up over the faster", fmt_fixed(2, "x")),
    Column("ours_gbps", "ours GB/s", fmt_num()),
    Column("floor_ms", "floor ms", fmt_num()),
    Column("ours_over_floor", "ours/floor", fmt_fixed(2)),
    *TARGET_COLUMNS,
]


def run(args: Any) -> Report:
    device = resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cpu")  # the op is F.linear on CUDA: the kernel is the CPU's
    timing = timing_for(args, device)
    bandwidth, how = read_bandwidth(device)
    header = environment_header(device, timing.describe(device) + ", the three ways in turns", (bandwidth, how)) | {
        "floor": "the weight's bytes at the measured read bandwidth (each call reads a weight not in cache)",
        "sizes": "quick (targets not checked)" if args.quick else "default",
    }
    return run_cases(
        Report("small_rows", header, COLUMNS),
        default_cases(args.quick),
        lambda case: run_case(case, device, timing, bandwidth),
        lambda case: f"{case.name} {DTYPE_NAMES[case.dtype]} {case.shape}",
        device,
    )
