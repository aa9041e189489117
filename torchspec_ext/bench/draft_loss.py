"""``draft_topk_kl`` forward + backward against eager torch and the peers, in the same run.

Eager baseline: ``logits = hidden @ weight.T`` (in the input dtype), ``.float()``, divided by T
when T != 1, ``log_softmax``, gather of the teacher ids, weighted sum, mean, then
``torch.autograd.grad`` for hidden and weight. Ours: the op and ``torch.autograd.grad``. Both
times include the backward; extra memory is the peak beyond the inputs and the returned gradients.
The floor is 6·N·H·Vd FLOPs (the logits GEMM and the two gradient GEMMs, which eager needs too)
at the matrix rate measured by timing ``hidden @ weight.T`` alone. The peers' fused linear
cross-entropy (torch's chunked ``F.linear_cross_entropy``; liger-kernel and Cut Cross-Entropy on
CUDA, where they import) runs on the k = 1 version of the case (labels = the teacher's first id),
beside ours on that version.

The LK losses (``loss="lk_alpha"`` / ``"lk_lambda"``) are timed against ``"kl"`` in turns, in the
eager one-pass form and as the forward op + backward op that ``torch.compile`` runs: the same GEMMs,
plus the per-row acceptance terms over the k teacher entries (lk_lambda's eager form makes the
logits once more: its weight needs every row's acceptance before any gradient).
"""

from __future__ import annotations

import functools
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
    memory_method,
    peak_extra_bytes,
    peer_result,
    resolve_device,
    run_cases,
    target,
    time_compiled,
    time_ms,
    time_ms_interleaved,
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
from torchspec_ext.ops import draft_topk_kl


@dataclass(frozen=True)
class Case:
    n: int
    h: int
    v: int
    k: int
    dtype: torch.dtype
    temperature: float = 1.0
    compile: bool = False  # also time the torch.compile baseline
    # Targets, None where the case has none.
    max_time_ratio: float | None = None  # ours / eager
    max_extra_ratio: float | None = None  # ours' extra memory / eager's

    @property
    def shape(self) -> str:
        return f"N={self.n} H={self.h} Vd={self.v} k={self.k}"

    def goals(self) -> list[Goal]:
        goals = []
        if self.max_time_ratio is not None:
            goals.append(
                Goal(
                    f"time ≤ {self.max_time_ratio:g}x eager",
                    lambda row: row["time_ratio"] > self.max_time_ratio,
                    "time",
                )
            )
        if self.max_extra_ratio is not None:
            goals.append(
                Goal(
                    f"extra mem ≤ {self.max_extra_ratio:.0%} of eager's",
                    lambda row: not row.get("extra_ratio", 1.0) <= self.max_extra_ratio,
                    "memory",
                )
            )
        return goals


def default_cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        if quick:
            return [Case(1024, 1024, 32000, 64, torch.bfloat16, compile=True)]
        return [
            Case(2048, 4096, 32000, 64, torch.bfloat16),
            Case(8192, 4096, 32000, 64, torch.bfloat16, max_time_ratio=1.0, max_extra_ratio=0.10, compile=True),
        ]
    if quick:
        return [Case(128, 128, 4096, 64, torch.float32), Case(512, 128, 4096, 64, torch.float32, compile=True)]
    return [
        Case(1024, 576, 8192, 64, torch.float32),
        Case(4096, 576, 8192, 64, torch.float32, max_time_ratio=1.3, max_extra_ratio=0.30, compile=True),
    ]


def make_inputs(case: Case, device: torch.device, gen: torch.Generator):
    hidden = torch.randn(case.n, case.h, device=device, generator=gen).to(case.dtype).requires_grad_()
    # Scaled so that the logits are O(1), as from a trained LM head.
    weight = (torch.randn(case.v, case.h, device=device, generator=gen) * case.h**-0.5).to(case.dtype).requires_grad_()
    indices = torch.randint(0, case.v, (case.n, case.k), device=device, generator=gen)
    indices[torch.rand(case.n, case.k, device=device, generator=gen) < 0.1] = -1  # teacher ids outside the draft vocab
    logprobs = torch.log_softmax(torch.randn(case.n, case.k, device=device, generator=gen) * 2, -1)
    return hidden, weight, indices, logprobs


def with_grads(loss_of: Callable) -> Callable:
    """A timed step: forward + backward of ``loss_of(hidden, weight)``; (loss, grad hidden, grad weight)."""

    def step(hidden, weight):
        loss = loss_of(hidden, weight)
        return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))

    return step


def loss_step(
    indices: torch.Tensor, logprobs: torch.Tensor, temperature: float, loss_fn: Callable = draft_topk_kl
) -> Callable:
    """Forward + backward of ``loss_fn`` (ours, or the compiled reference), which has the op's signature."""
    return with_grads(lambda hidden, weight: loss_fn(hidden, weight, indices, logprobs, None, temperature)[0])


def eager_step(indices: torch.Tensor, logprobs: torch.Tensor, temperature: float) -> Callable:
    def loss_of(hidden, weight):
        logits = (hidden @ weight.T).float()
        if temperature != 1.0:  # skipped at T = 1 (an extra [N, Vd] pass): the fastest eager form
            logits = logits / temperature
        logq = torch.log_softmax(logits, -1)
        present = indices >= 0
        counted = present.any(-1)
        p = torch.softmax(logprobs.masked_fill(~present, float("-inf")), -1).nan_to_num(0.0)
        per_row = -(p * logq.gather(1, indices.clamp_min(0))).sum(-1)
        return torch.where(counted, per_row, 0.0).sum() / counted.sum().clamp_min(1)

    return with_grads(loss_of)


LK_LOSSES = ("lk_alpha", "lk_lambda")


def two_op_step(indices: torch.Tensor, logprobs: torch.Tensor, temperature: float, loss: str) -> Callable:
    """The forward op then the backward op (what ``torch.compile`` runs), for one loss kind."""

    def step(hidden, weight):
        with torch.no_grad():
            value, _, lse, logq = torch.ops.torchspec.draft_topk_kl.default(
                hidden, weight, indices, logprobs, None, temperature, loss
            )
            one = torch.ones((), device=hidden.device)
            grads = torch.ops.torchspec.draft_topk_kl_backward.default(
                one, hidden, weight, indices, logprobs, None, lse, logq, temperature, loss
            )
        return value, *grads

    return step


def lk_results(case: Case, args: list, indices, logprobs, device: torch.device, timing: Timing) -> dict[str, Any]:
    """LK against KL, each form timed in turns; the LK losses' error against the eager reference."""
    t = case.temperature
    row: dict[str, Any] = {}
    eager_forms = [
        loss_step(indices, logprobs, t, functools.partial(draft_topk_kl, loss=name)) for name in ("kl", *LK_LOSSES)
    ]
    two_op_forms = [two_op_step(indices, logprobs, t, name) for name in ("kl", *LK_LOSSES)]
    for prefix, forms in (("", eager_forms), ("two_op_", two_op_forms)):
        kl_ms, *lk_ms = time_ms_interleaved(forms, args, device, timing)
        row[f"{prefix}kl_ms"] = kl_ms
        for name, ms in zip(LK_LOSSES, lk_ms):
            row[f"{prefix}{name}_ms"] = ms
            row[f"{prefix}{name}_ratio"] = ms / kl_ms
    hidden, weight = args[0]
    for name, form in zip(LK_LOSSES, eager_forms[1:]):
        reference_step = loss_step(indices, logprobs, t, functools.partial(reference.draft_topk_kl, loss=name))
        row[f"{name}_error"] = max_rel_error(form(hidden, weight), reference_step(hidden, weight))
    return row


def k1_peers(labels: torch.Tensor) -> dict[str, Callable]:
    """Other libraries' fused linear cross-entropy, forward + backward, on the k = 1 version of a
    case (``labels``: the teacher's first id), each where it imports: torch's own chunked
    ``F.linear_cross_entropy`` (torch >= 2.13), liger-kernel and Cut Cross-Entropy (CUDA)."""
    losses: dict[str, Callable] = {}
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()  # opts in to the chunked path
        losses["torch_lce"] = lambda h, w: torch.nn.functional.linear_cross_entropy(h, w, labels, options=options)
    if labels.is_cuda:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            losses["liger"] = lambda h, w: liger(w, h, labels)
        except Exception:  # not installed, or no GPU build of triton
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy

            losses["cce"] = lambda h, w: linear_cross_entropy(h, w, labels)
        except Exception:
            pass
    return {name: with_grads(fn) for name, fn in losses.items()}


def max_rel_error(ours, eager) -> float:
    """Largest difference of loss and gradients, each relative to the eager value's largest entry."""
    return max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        for a, b in zip(ours, eager)
    )


def run_case(case: Case, device: torch.device, timing: Timing) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(0)
    hidden, weight, indices, logprobs = make_inputs(case, device, gen)
    t = case.temperature
    ours = loss_step(indices, logprobs, t)
    eager = eager_step(indices, logprobs, t)
    args = [(hidden, weight)]
    error = max_rel_error(ours(hidden, weight), eager(hidden, weight))
    # In turns: on a shared machine a changing load then weighs on both alike.
    ours_ms, eager_ms = time_ms_interleaved([ours, eager], args, device, timing)
    ours_extra = peak_extra_bytes(ours, args[0], device)
    eager_extra = peak_extra_bytes(eager, args[0], device)
    row: dict[str, Any] = {
        "device": device.type,
        "dtype": DTYPE_NAMES[case.dtype],
        "shape": case.shape,
        "n": case.n,
        "h": case.h,
        "v": case.v,
        "k": case.k,
        "temperature": t,
        "ours_ms": ours_ms,
        "eager_ms": eager_ms,
        "time_ratio": ours_ms / eager_ms,
        "max_rel_error": error,
        "target": target(case.goals()),
    }
    if case.compile:
        compiled = lambda fn: loss_step(indices, logprobs, t, fn)
        row.update(time_compiled(reference.draft_topk_kl, compiled, args, device, timing, ours_ms))
    if ours_extra is not None and eager_extra is not None:
        row.update(
            ours_extra_mib=ours_extra / MiB,
            eager_extra_mib=eager_extra / MiB,
            extra_ratio=ours_extra / max(eager_extra, 1),
        )
    row.update(lk_results(case, args, indices, logprobs, device, timing))
    with torch.no_grad():
        gemm_ms = time_ms(lambda h, w: h @ w.T, args, device, timing)
    rate = 2 * case.n * case.h * case.v / (gemm_ms * 1e-3)
    floor_ms = 6 * case.n * case.h * case.v / rate * 1e3
    row.update(gemm_tflops=rate / 1e12, floor_ms=floor_ms, ours_over_floor=ours_ms / floor_ms)
    peers = k1_peers(indices[:, 0].clamp_min(0))
    if peers:
        ours_k1 = loss_step(indices[:, :1].clamp_min(0), torch.zeros_like(logprobs[:, :1]), 1.0)
        row["ours_k1_ms"] = time_ms(ours_k1, args, device, timing)
        for name, step in peers.items():
            row.update(peer_result(name, lambda: {f"{name}_ms": time_ms(step, args, device, timing)}))  # noqa: B023
    # Against eager in the same dtype; bfloat16 eager rounds its logits, ours does not.
    tolerance = 1e-3 if case.dtype == torch.float32 else 0.1
    error = max(error, *(row[f"{name}_error"] for name in LK_LOSSES))
    row["result"] = verdict(case.goals(), row, None if error <= tolerance else f"WRONG (max rel err {error:.2g})")
    return row


COLUMNS = [
    Column("device", "device"),
    Column("dtype", "dtype"),
    Column("shape", "shape"),
    Column("ours_ms", "ours ms", fmt_num()),
    Column("eager_ms", "eager ms", fmt_num()),
    Column("time_ratio", "ours/eager time", fmt_fixed(2, "x")),
    *COMPILE_COLUMNS,
    Column("floor_ms", "floor ms", fmt_num()),
    Column("ours_over_floor", "ours/floor", fmt_fixed(2)),
    Column("gemm_tflops", "GEMM TFLOP/s", fmt_num()),
    Column("ours_extra_mib", "ours extra MiB", fmt_fixed(1)),
    Column("eager_extra_mib", "eager extra MiB", fmt_fixed(1)),
    Column("extra_ratio", "ours/eager extra", fmt_percent(1)),
    Column("torch_lce_ms", "torch LCE k=1 ms", fmt_num()),
    Column("liger_ms", "liger k=1 ms", fmt_num()),
    Column("cce_ms", "CCE k=1 ms", fmt_num()),
    Column("ours_k1_ms", "ours k=1 ms", fmt_num()),
    Column("max_rel_error", "max rel err vs eager", fmt_num(2)),
    Column("kl_ms", "kl ms (LK set)", fmt_num()),
    Column("lk_alpha_ratio", "lk_alpha/kl", fmt_fixed(2, "x")),
    Column("lk_lambda_ratio", "lk_lambda/kl", fmt_fixed(2, "x")),
    Column("two_op_kl_ms", "2-op kl ms", fmt_num()),
    Column("two_op_lk_alpha_ratio", "2-op lk_alpha/kl", fmt_fixed(2, "x")),
    Column("two_op_lk_lambda_ratio", "2-op lk_lambda/kl", fmt_fixed(2, "x")),
    Column("lk_alpha_error", "lk_alpha rel err", fmt_num(2)),
    Column("lk_lambda_error", "lk_lambda rel err", fmt_num(2)),
    *TARGET_COLUMNS,
]


def run(args: Any) -> Report:
    device = resolve_device(args.device)
    timing = timing_for(args, device)
    if device.type == "cpu" and not args.repeat:
        # One pair of calls takes seconds and another job's load swings single samples by 2x:
        # 7 pairs in turns (about a minute) rather than the 3 that the shared 2 s budget allows.
        timing = Timing(7, 1)
    header = environment_header(device, timing.describe(device) + "; forward + backward; ours and eager timed in turns")
    header |= {
        "extra memory": memory_method(device),
        "compile": COMPILE_NOTE,
        "peers": "k = 1: torch's chunked F.linear_cross_entropy where torch has it; liger-kernel and Cut "
        "Cross-Entropy on CUDA where they import",
        "sizes": "quick (targets not checked)" if args.quick else "default",
        "lk": "lk_alpha, lk_lambda against kl, timed in turns: eager one-pass, and the forward op + backward op "
        "(torch.compile's form, 2-op)",
    }
    return run_cases(
        Report("draft_loss", header, COLUMNS),
        default_cases(device, args.quick),
        lambda case: run_case(case, device, timing),
        lambda case: f"{DTYPE_NAMES[case.dtype]} {case.shape}",
        device,
    )
