"""``tree_attention`` against torch SDPA with a dense boolean mask, and the verification ops, in
the same run.

tree_attention: the baseline is ``F.scaled_dot_product_attention(q, k, v, attn_mask, enable_gqa=True)``
with the ``[B, 1, T, S]`` boolean tree mask built beforehand (not timed), S = prefix + T. Both
outputs are compared with a float64 reference on the first input set. The bytes the CUDA kernel
moves are printed against the floor (q, k, v read once, out written once) for every case: for
bfloat16 / float16 the tensor-core kernel's (``_C.tree_attention_cuda_cost``, csrc/common/tree.h:
blocks of 64 packed query rows, the keys split into ranges merged by a second kernel), for float32
the CUDA-core kernel's (``cuda_attention_bytes``). The header gives, for the GPU shapes, GPU or
not, the tensor-core kernel's bytes and FLOPs against the floor, and the times both take at an
H100 SXM's and an H200's rates (``GPU_RATES``) on their 132 multiprocessors.

Verification: the tree is a chain whose every node is accepted (every draft token is the
target's argmax at its parent), the worst case, in which all T logits rows of every batch row are
read. The floor is one read of all the logits at the measured bandwidth; the baseline is the
eager argmax (greedy) or softmax (sampling) over all the logits, which a Python walk would
then need. "walk" rows give the op a vocabulary of 1, so that the argmaxes are known and what is
timed is the walk (with the op's argument checks and, on CUDA, its launch and host copies).

Peer, on CUDA where it imports: flashinfer's chain speculative sampling on the
``verify_tree_sampling`` rows' chains, see ``FLASHINFER_NOTE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from torchspec_ext import _C, reference
from torchspec_ext.bench.common import (
    DTYPE_NAMES,
    Goal,
    Timing,
    import_flashinfer,
    input_set_count,
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
)
from torchspec_ext.ops import tree_attention, verify_tree_greedy, verify_tree_sampling

ATTN, GREEDY, SAMPLING, WALK = "tree_attention", "verify_tree_greedy", "verify_tree_sampling", "greedy walk"

# The CUDA-core tree_attention kernel's query rows per block (kTreeAttentionRowsPerBlock, csrc/common/tree.h):
# a block serves the G query heads of one kv head for a tile of 64 / G nodes.
CUDA_ROWS_PER_BLOCK = 64

# (name, HBM bytes/s, dense bf16 tensor-core FLOP/s, multiprocessors) of the GPUs this project targets.
GPU_RATES = [("H100 SXM", 3.35e12, 989e12, 132), ("H200", 4.8e12, 989e12, 132)]

# The GPU shapes: the issue-31 shape (B 4, Hq 9 / Hkv 3, D 64) and the GPU benchmark's (Hq 32 / Hkv 8, D 128).
GPU_SHAPES = [(4, 9, 3, 64, 4096, 64), (1, 32, 8, 64, 4096, 128), (8, 32, 8, 64, 4096, 128), (64, 32, 8, 64, 4096, 128)]


def cuda_attention_bytes(batch: int, q_heads: int, kv_heads: int, nodes: int, prefix: int, dim: int, esize: int) -> int:
    """Bytes the CUDA-core tree_attention kernel (float32) reads and writes (tree_attention_cuda_bytes
    in csrc/common/tree.h): per block, its rows' queries and outputs, the prefix's keys and values,
    and the tree's up to its last node."""
    group = q_heads // kv_heads
    tile = 1 if group >= CUDA_ROWS_PER_BLOCK else CUDA_ROWS_PER_BLOCK // group
    per_unit = sum(
        2 * group * min(tile, nodes - j0) * dim + 2 * (prefix + j0 + min(tile, nodes - j0)) * dim
        for j0 in range(0, nodes, tile)
    )
    return batch * kv_heads * per_unit * esize


def attention_floor_bytes(
    batch: int, q_heads: int, kv_heads: int, nodes: int, prefix: int, dim: int, esize: int
) -> int:
    """q, k and v read once, out written once."""
    return (2 * batch * q_heads * nodes + 2 * batch * kv_heads * (prefix + nodes)) * dim * esize


def tensor_core_cost(batch, q_heads, kv_heads, nodes, prefix, dim, esize, sm_count=132) -> dict:
    """What the tensor-core kernel moves and computes (csrc/common/tree.h's tree_attention_mma_cost)."""
    return _C.tree_attention_cuda_cost(batch, q_heads, kv_heads, nodes, prefix, dim, esize, sm_count)


def gpu_shape_notes() -> dict[str, str]:
    """For each GPU shape (bfloat16): the tensor-core kernel's bytes and FLOPs against the floor, and
    the time each takes at the GPUs' rates. Arithmetic (csrc/common/tree.h), not a measurement."""
    notes = {}
    for shape in GPU_SHAPES:
        batch, q_heads, kv_heads, nodes, prefix, dim = shape
        c = tensor_core_cost(*shape, 2)
        mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
        parts = [
            f"{c['splits']} key range(s) per block of rows; its blocks load and store {mib(c['bytes'])}, "
            f"{mib(c['unique_bytes'])} once each ({c['unique_bytes'] / c['floor_bytes']:.2f}x the floor of "
            f"{mib(c['floor_bytes'])}: what memory serves when L2 holds a range for its other blocks of rows); "
            f"{c['executed_flops'] / 1e9:.2f} GFLOP on tensor cores (dense attention {c['dense_flops'] / 1e9:.2f})"
        ]
        for name, bandwidth, flops, _ in GPU_RATES:
            floor_us = max(c["floor_bytes"] / bandwidth, c["dense_flops"] / flops) * 1e6
            ours_us = max(c["unique_bytes"] / bandwidth, c["executed_flops"] / flops) * 1e6
            parts.append(f"{name}: floor {floor_us:.1f} us, the kernel's unique bytes and FLOPs {ours_us:.1f} us")
        key = f"CUDA tree_attention B={batch} T={nodes} prefix={prefix} Hq={q_heads} Hkv={kv_heads} D={dim} bf16"
        notes[key] = "; ".join(parts)
    return notes


FLASHINFER_NOTE = (
    "flashinfer.sampling.chain_speculative_sampling on the verify_tree_sampling rows' chains (T nodes: "
    "T - 1 draft tokens and a bonus position). It takes probabilities where ours takes logits and a "
    "temperature: target_probs = softmax(logits / temperature) [B, T, V] float32 (temperature 1 here) "
    "and draft_probs = the one-hot of the draft tokens [B, T - 1, V] float32 (ours verifies point-mass "
    "drafts, for which both rules are the "
    "same: accept with p(token), else sample from p without it) are made before timing, so its time "
    "leaves out the softmax that ours includes (the baseline column times that softmax); "
    "draft_token_ids int32, a generator on the device. It verifies chains only, ours trees; its mean "
    "accepted count is flashinfer_accepted in the JSON"
)


@dataclass(frozen=True)
class Case:
    op: str
    batch: int
    nodes: int
    dtype: torch.dtype
    prefix: int = 0  # attention
    q_heads: int = 32
    kv_heads: int = 8
    dim: int = 128
    vocab: int = 0  # verification
    compile: bool = False  # also time the torch.compile baseline (attention only)
    # Targets, None where the case has none.
    min_speedup: float | None = None  # baseline / ours
    max_floor_ratio: float | None = None  # ours / one read of the logits
    max_us: float | None = None  # ours, absolute

    @property
    def shape(self) -> str:
        if self.op == ATTN:
            return (
                f"B={self.batch} T={self.nodes} prefix={self.prefix} Hq={self.q_heads} Hkv={self.kv_heads} D={self.dim}"
            )
        return f"B={self.batch} T={self.nodes} V={self.vocab}"

    @property
    def logits_bytes(self) -> int:
        return self.batch * self.nodes * self.vocab * torch.empty((), dtype=self.dtype).element_size()

    def goals(self) -> list[Goal]:
        goals = []
        if self.min_speedup is not None:
            goals.append(
                Goal(f"speed-up ≥ {self.min_speedup:g}x", lambda row: row["speedup"] < self.min_speedup, "speed-up")
            )
        if self.max_floor_ratio is not None:
            goals.append(
                Goal(
                    f"≤ {self.max_floor_ratio:g}x one read",
                    lambda row: row["ours_over_floor"] > self.max_floor_ratio,
                    "one read",
                )
            )
        if self.max_us is not None:
            goals.append(Goal(f"< {self.max_us:g} µs", lambda row: row["ours_ms"] * 1e3 >= self.max_us, "µs"))
        return goals


def default_cases(device: torch.device, quick: bool) -> list[Case]:
    bf16, f32 = torch.bfloat16, torch.float32
    if device.type == "cuda":
        if quick:
            return [
                Case(ATTN, 2, 64, bf16, prefix=1024, compile=True),
                Case(GREEDY, 8, 64, bf16, vocab=32768),
                Case(SAMPLING, 8, 64, bf16, vocab=32768),
                Case(WALK, 8, 64, bf16, vocab=1),
            ]
        return [
            *(Case(ATTN, b, 64, bf16, prefix=4096, min_speedup=2.0, compile=b == 8) for b in (1, 8, 64)),
            Case(ATTN, 4, 64, bf16, prefix=4096, q_heads=9, kv_heads=3, dim=64, min_speedup=2.0),
            Case(GREEDY, 64, 64, bf16, vocab=152064, max_floor_ratio=1.2),
            Case(SAMPLING, 64, 64, bf16, vocab=152064),
            Case(WALK, 64, 64, bf16, vocab=1, max_us=20.0),
        ]
    if quick:
        return [
            Case(ATTN, 1, 16, f32, prefix=256, q_heads=8, kv_heads=2, dim=64, compile=True),
            Case(ATTN, 1, 16, f32, prefix=1024, q_heads=8, kv_heads=2, dim=64),
            Case(ATTN, 1, 16, bf16, prefix=256, q_heads=8, kv_heads=2, dim=64),
            Case(GREEDY, 4, 16, bf16, vocab=8192),
            Case(SAMPLING, 4, 16, bf16, vocab=8192),
            Case(WALK, 4, 16, bf16, vocab=1),
        ]
    return [
        Case(ATTN, 1, 64, f32, prefix=1024),
        Case(ATTN, 1, 64, f32, prefix=4096, min_speedup=1.0, compile=True),
        Case(ATTN, 1, 64, bf16, prefix=4096, min_speedup=1.0),
        Case(ATTN, 4, 64, bf16, prefix=1024, min_speedup=1.0),
        Case(GREEDY, 16, 64, bf16, vocab=152064),
        Case(SAMPLING, 16, 64, bf16, vocab=152064),
        Case(WALK, 64, 64, bf16, vocab=1),
    ]


def random_parents(batch: int, nodes: int, gen: torch.Generator) -> torch.Tensor:
    """Random trees (parents[j] uniform in [0, j)), the same for every batch row."""
    parents = torch.full((nodes,), -1, dtype=torch.int64)
    for j in range(1, nodes):
        parents[j] = int(torch.randint(0, j, (1,), generator=gen))
    return parents.expand(batch, nodes).contiguous()


def tree_mask(prefix: int, parents: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, prefix + T] bool, True where node j may attend."""
    batch, nodes = parents.shape
    anc = torch.eye(nodes, dtype=torch.bool).expand(batch, nodes, nodes).clone()
    for j in range(1, nodes):  # parents come first: row j = row parent(j) plus j itself
        anc[:, j] |= anc[torch.arange(batch), parents[:, j]]
    mask = torch.cat([torch.ones(batch, nodes, prefix, dtype=torch.bool), anc], dim=-1)
    return mask.unsqueeze(1)


def attention_inputs(case: Case, device: torch.device, gen: torch.Generator) -> tuple:
    seq = case.prefix + case.nodes
    make = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=case.dtype)
    q = make(case.batch, case.q_heads, case.nodes, case.dim)
    k = make(case.batch, case.kv_heads, seq, case.dim)
    v = make(case.batch, case.kv_heads, seq, case.dim)
    parents = random_parents(case.batch, case.nodes, gen)
    lens = torch.full((case.batch,), case.prefix, dtype=torch.int64)
    mask = tree_mask(case.prefix, parents).to(device)
    return q, k, v, lens.to(device), parents.to(device), mask


def verify_inputs(case: Case, device: torch.device, gen: torch.Generator) -> tuple:
    """A chain of T nodes whose every draft token is the target's argmax at its parent."""
    logits = torch.randn(case.batch, case.nodes, case.vocab, generator=gen).to(device=device, dtype=case.dtype)
    parents = torch.arange(-1, case.nodes - 1, device=device).expand(case.batch, -1).contiguous()
    tokens = torch.zeros(case.batch, case.nodes, dtype=torch.int64, device=device)
    tokens[:, 1:] = logits[:, :-1].argmax(-1)
    return tokens, parents, logits


def attention_reference(q, k, v, mask) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)


def run_attention(case: Case, device: torch.device, timing: Timing) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    first = attention_inputs(case, device, gen)
    per_set = sum(t.nbytes for t in first[:3])
    sets = [first] + [attention_inputs(case, device, gen) for _ in range(input_set_count(per_set, device) - 1)]
    ours = lambda q, k, v, lens, parents, mask: tree_attention(q, k, v, lens, parents)
    baseline = lambda q, k, v, lens, parents, mask: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True
    )
    ref = attention_reference(first[0], first[1], first[2], first[5])
    ours_err = (ours(*first).double() - ref).abs().max().item()
    baseline_err = (baseline(*first).double() - ref).abs().max().item()
    ours_ms = time_ms(ours, sets, device, timing)
    baseline_ms = time_ms(baseline, sets, device, timing)
    row = {
        "ours_ms": ours_ms,
        "baseline": "SDPA + bool mask",
        "baseline_ms": baseline_ms,
        "speedup": baseline_ms / ours_ms,
        "ours_err": ours_err,
        "baseline_err": baseline_err,
    }
    if case.compile:
        compiled = lambda fn: lambda q, k, v, lens, parents, mask: fn(q, k, v, lens, parents)
        row.update(time_compiled(reference.tree_attention, compiled, sets, device, timing, ours_ms))
    esize = torch.empty((), dtype=case.dtype).element_size()
    shape = (case.batch, case.q_heads, case.kv_heads, case.nodes, case.prefix, case.dim, esize)
    if case.dtype == torch.float32:  # the CUDA-core kernel
        cuda_bytes, cuda_flops = cuda_attention_bytes(*shape), None
    else:
        cost = tensor_core_cost(*shape)
        cuda_bytes, cuda_flops = cost["bytes"], cost["executed_flops"]
    row["cuda_gb"] = cuda_bytes / 1e9
    row["cuda_over_floor"] = cuda_bytes / attention_floor_bytes(*shape)
    if cuda_flops is not None:
        row["cuda_gflop"] = cuda_flops / 1e9
    # Correct when no worse than twice the baseline's own error (float32: a few 1e-6).
    wrong = None if ours_err <= max(2 * baseline_err, 1e-5) else f"WRONG (max err {ours_err:.2g})"
    return row | {"result": verdict(case.goals(), row, wrong)}


def chain_probs(tokens: torch.Tensor, logits: torch.Tensor, temperature: float) -> tuple:
    """A chain from verify_inputs as flashinfer's chain speculative sampling takes it: draft_probs
    [B, T-1, V] (one-hot: our drafts are point masses), draft_token_ids [B, T-1] int32 and
    target_probs [B, T, V], the probabilities float32 (it converts them to float32 itself otherwise)."""
    draft_ids = tokens[:, 1:]  # node 0 is the last accepted token, not a draft
    draft_probs = torch.zeros(*draft_ids.shape, logits.shape[-1], device=logits.device)
    draft_probs.scatter_(-1, draft_ids.unsqueeze(-1), 1.0)
    target_probs = torch.softmax(logits.float() / temperature, -1)
    return draft_probs, draft_ids.to(torch.int32), target_probs


def flashinfer_peer(
    flashinfer: Any, sets: list[tuple], temperature: float, device: torch.device, timing: Timing
) -> dict[str, Any]:
    """flashinfer's chain speculative sampling on the same chains: its time, and its mean number of
    accepted draft tokens on the first set (comparable with ours' "mean accepted")."""
    chains = [chain_probs(tokens, logits, temperature) for tokens, _, logits in sets]
    gen = torch.Generator(device=device).manual_seed(1)
    verify = lambda draft_probs, draft_ids, target_probs: flashinfer.sampling.chain_speculative_sampling(
        draft_probs=draft_probs, draft_token_ids=draft_ids, target_probs=target_probs, generator=gen
    )
    _, _, emitted = verify(*chains[0])  # (output_token_ids, accepted_token_num, emitted_draft_token_num)
    ms = time_ms(verify, chains, device, timing)
    return {"flashinfer_ms": ms, "flashinfer_accepted": emitted.double().mean().item()}


def run_verify(
    case: Case, device: torch.device, timing: Timing, bandwidth: float, flashinfer: Any = None
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    first = verify_inputs(case, device, gen)
    count = input_set_count(first[2].nbytes, device) if case.vocab > 1 else 1
    sets = [first] + [verify_inputs(case, device, gen) for _ in range(count - 1)]
    temperature = 1.0
    if case.op == SAMPLING:
        sample_gen = torch.Generator().manual_seed(1)
        ours = lambda tokens, parents, logits: verify_tree_sampling(tokens, parents, logits, temperature, sample_gen)
        baseline = lambda tokens, parents, logits: torch.softmax(logits.float(), -1)
        baseline_name = "softmax of all logits"
    else:
        ours = lambda tokens, parents, logits: verify_tree_greedy(tokens, parents, logits)
        baseline = lambda tokens, parents, logits: logits.argmax(-1)
        baseline_name = "argmax of all logits"
    num, _, _ = ours(*first)
    # The chain is entirely accepted by the greedy walk (and, for sampling, as often as p allows).
    wrong = None if case.op == SAMPLING or bool((num == case.nodes - 1).all()) else "WRONG"
    ours_ms = time_ms(ours, sets, device, timing)
    row: dict[str, Any] = {"ours_ms": ours_ms, "accepted": num.double().mean().item()}
    if case.op != WALK:
        baseline_ms = time_ms(baseline, sets, device, timing)
        floor_ms = case.logits_bytes / bandwidth * 1e3
        row.update(
            baseline=baseline_name,
            baseline_ms=baseline_ms,
            speedup=baseline_ms / ours_ms,
            floor_ms=floor_ms,
            ours_over_floor=ours_ms / floor_ms,
        )
    if case.op == SAMPLING and flashinfer is not None:
        row.update(peer_result("flashinfer", lambda: flashinfer_peer(flashinfer, sets, temperature, device, timing)))
    return row | {"result": verdict(case.goals(), row, wrong)}


COLUMNS = [
    Column("op", "op"),
    Column("device", "device"),
    Column("dtype", "dtype"),
    Column("shape", "shape"),
    Column("ours_ms", "ours ms", fmt_num()),
    Column("baseline", "baseline"),
    Column("baseline_ms", "baseline ms", fmt_num()),
    Column("speedup", "speed-up", fmt_fixed(2, "x")),
    *COMPILE_COLUMNS,
    Column("flashinfer_ms", "flashinfer chain ms", fmt_num()),
    Column("floor_ms", "one read ms", fmt_num()),
    Column("ours_over_floor", "ours/one read", fmt_fixed(2)),
    Column("cuda_gb", "CUDA kernel GB", fmt_num()),
    Column("cuda_over_floor", "CUDA GB/floor", fmt_fixed(2)),
    Column("cuda_gflop", "CUDA GFLOP (tensor cores)", fmt_num()),
    Column("accepted", "mean accepted", fmt_fixed(1)),
    Column("ours_err", "ours max err", fmt_num(2)),
    Column("baseline_err", "baseline max err", fmt_num(2)),
    *TARGET_COLUMNS,
]


def run(args: Any) -> Report:
    device = resolve_device(args.device)
    timing = timing_for(args, device)
    bandwidth, how = read_bandwidth(device)
    flashinfer, flashinfer_status = import_flashinfer(device)
    header = (
        environment_header(device, timing.describe(device), (bandwidth, how))
        | {
            "trees": "attention: random trees, mask built before timing; verification: fully accepted chains",
            "compile": COMPILE_NOTE + "; attention only (the verification references are Python walks)",
            "peer": f"{flashinfer_status}. {FLASHINFER_NOTE}",
            "sizes": "quick (targets not checked)" if args.quick else "default",
        }
        | gpu_shape_notes()
    )

    def run_one(case: Case) -> dict[str, Any]:
        if case.op == ATTN:
            row = run_attention(case, device, timing)
        else:
            row = run_verify(case, device, timing, bandwidth, flashinfer)
        return {
            "op": case.op,
            "device": device.type,
            "dtype": DTYPE_NAMES[case.dtype],
            "shape": case.shape,
            # The size that the report's plots put on the x axis: elements of the scores or of the logits.
            "elements": case.batch
            * case.nodes
            * (case.q_heads * (case.prefix + case.nodes) if case.op == ATTN else case.vocab),
            "target": target(case.goals()),
        } | row

    return run_cases(
        Report("tree", header, COLUMNS),
        default_cases(device, args.quick),
        run_one,
        lambda case: f"{case.op} {DTYPE_NAMES[case.dtype]} {case.shape}",
        device,
    )
