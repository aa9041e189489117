#!/usr/bin/env python3
"""Bugs planted in the CUDA kernels and the op layer, one at a time, that the emulator tests must catch.

Each mutation edits one file of a copy of csrc/, builds the emulator test against it (only what
the edit touches is recompiled: objects are cached, by content, in build/cuda_emulator/ beside the
test's own) and runs the family once per thread order ("op_layer": the op layer's test, once). A
run is "caught" when it fails; the table says by what: a fault of the emulator (deadlock,
divergence, overflow ...) or a comparison (with the CPU twin, or the op layer's checks).
Prints a markdown table (docs/cuda_emulator.md holds the last one).

--quick: the subset CI runs (.ci/run, under a minute on two cores): one order and one small case
per mutation, each of which must be caught; the exit status says whether all were.

Usage: python scripts/cuda_emulator_mutations.py [--quick] [--only SUBSTRING] [--orders forward,reverse,...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python_tests"))
from cuda_emulator_build import build, build_op_layer, build_pipeline  # noqa: E402

ORDERS = ["forward", "reverse", "random", "eager"]

# (what, file under csrc/, text, replacement, family)
MUTATIONS = [
    (
        "topk: no barrier between the histogram and its scan (compact)",
        "kernels/topk_lse.cu",
        "      if ((key & mask) == prefix) atomicAdd(&st.hist[(key >> shift) & 255], 1);\n"
        "    }\n    __syncthreads();\n",
        "      if ((key & mask) == prefix) atomicAdd(&st.hist[(key >> shift) & 255], 1);\n    }\n",
        "topk",
    ),
    (
        "topk: no barrier before the next tile adds to the count",
        "kernels/topk_lse.cu",
        "    __syncthreads();  // every thread has read count before the next tile adds to it\n",
        "",
        "topk",
    ),
    (
        "topk: the slot broadcast under a lane condition (offer)",
        "kernels/topk_lse.cu",
        "  base = __shfl_sync(0xFFFFFFFFu, base, 0);",
        "  if (lane < 16) base = __shfl_sync(0xFFFFFFFFu, base, 0);",
        "topk",
    ),
    (
        "topk: head (unaligned elements) one too many",
        "kernels/topk_lse.cu",
        "((16 - (addr & 15)) & 15) / sizeof(T)))",
        "((16 - (addr & 15)) & 15) / sizeof(T) + 1))",
        "topk",
    ),
    (
        "topk: candidate buffer half a tile short (shared overflow)",
        "kernels/topk_lse.cu",
        "const int capacity = p.k + 2 * kTile + 32;",
        "const int capacity = p.k + kTile / 2 + 32;",
        "topk",
    ),
    (
        "warp_sum skips its last shuffle step",
        "kernels/cuda_common.cuh",
        "  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, d);",
        "  for (int d = 16; d > 1; d >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, d);",
        "tree_attention",
    ),
    (
        "attention: no barrier before a key tile is overwritten",
        "kernels/tree.cu",
        "    __syncthreads();  // the previous tile's keys, values, probabilities and masks are consumed\n",
        "",
        "tree_attention",
    ),
    (
        "attention: no __syncwarp before P @ V reads the probabilities",
        "kernels/tree.cu",
        "    __syncwarp();  // the warp's probabilities are written\n",
        "",
        "tree_attention",
    ),
    (
        "attention: the row maximum under a lane condition",
        "kernels/tree.cu",
        "      const float m_new = fmaxf(m[i], warp_max(s));",
        "      const float m_new = fmaxf(m[i], lane < n ? warp_max(s) : s);",
        "tree_attention",
    ),
    (
        "attention: the tree tiles stop before tile 0 (off by one)",
        "kernels/tree.cu",
        "for (int64_t t0 = last / kKeyTile * kKeyTile; t0 >= 0; t0 -= kKeyTile) {",
        "for (int64_t t0 = last / kKeyTile * kKeyTile; t0 > 0; t0 -= kKeyTile) {",
        "tree_attention",
    ),
    (
        "attention: one node too many in the last tile (off by one)",
        "kernels/tree.cu",
        "const int nodes = static_cast<int>(min(tile_nodes, T_ - j0));",
        "const int nodes = static_cast<int>(min(tile_nodes, T_ - j0 + 1));",
        "tree_attention",
    ),
    (
        "attention: no room for the node masks (shared overflow)",
        "kernels/tree.cu",
        "kAttnWarps * kRowsPerWarp * kKeyTile + nodes);",
        "kAttnWarps * kRowsPerWarp * kKeyTile);",
        "tree_attention",
    ),
    (
        "attention (tensor cores): no barrier after a tile's copies land",
        "kernels/tree.cu",
        "    __syncthreads();  // tile t (and, at the first, the queries and masks) is in shared memory\n",
        "",
        "tree_attention",
    ),
    (
        "attention (tensor cores): no barrier before a stage is loaded again",
        "kernels/tree.cu",
        "    __syncthreads();  // every warp is done with this stage before tile t + 2 is loaded into it\n",
        "",
        "tree_attention",
    ),
    (
        "attention (tensor cores): the tile being used not waited for (cp.async)",
        "kernels/tree.cu",
        "      cp_async_wait<1>();",
        "      cp_async_wait<2>();",
        "tree_attention",
    ),
    (
        "attention (tensor cores): two keys of P swapped in a fragment",
        "kernels/tree.cu",
        "pack2<T>(s[2 * kk][2], s[2 * kk][3])",
        "pack2<T>(s[2 * kk][3], s[2 * kk][2])",
        "tree_attention",
    ),
    (
        "attention (tensor cores): a row's maximum over half its lanes",
        "kernels/tree.cu",
        "      mt[i] = fmaxf(mt[i], __shfl_xor_sync(0xFFFFFFFFu, mt[i], 2));\n",
        "",
        "tree_attention",
    ),
    (
        "attention (tensor cores): the ancestor bits of the wrong node",
        "kernels/tree.cu",
        "masks[(node - node_lo) * words + (a >> 6)]",
        "masks[(node - node_lo + 1) * words + (a >> 6)]",
        "tree_attention",
    ),
    (
        "attention (tensor cores): a tile 4 keys into the tree taken for all prefix",
        "kernels/tree.cu",
        "const bool prefix_only = key0 + kMmaKeys <= prefix;",
        "const bool prefix_only = key0 + kMmaKeys <= prefix + 4;",
        "tree_attention",
    ),
    (
        "attention (tensor cores): each key range one tile short",
        "kernels/tree.cu",
        "t_end = min(tiles, t_begin + per_split);",
        "t_end = min(tiles, t_begin + per_split - 1);",
        "tree_attention",
    ),
    (
        "attention (tensor cores): a range's log-sum-exp in base e",
        "kernels/tree.cu",
        "m[half] + log2f(lv)",
        "m[half] + logf(lv)",
        "tree_attention",
    ),
    (
        "verify: no barrier before thread 0 rewrites the walk's state",
        "kernels/tree.cu",
        "    __syncthreads();  // every thread has read the state before thread 0 changes it\n",
        "",
        "verify",
    ),
    (
        "verify: the argmax reduction's shuffle under a lane condition",
        "kernels/tree.cu",
        "    const uint64_t o = __shfl_xor_sync(0xFFFFFFFFu, key, d);",
        "    const uint64_t o = (threadIdx.x & 1) ? __shfl_xor_sync(0xFFFFFFFFu, key, d) : key;",
        "verify",
    ),
    (
        "verify: each segment of the final draw one token short (off by one)",
        "kernels/tree.cu",
        "const int64_t lo = tid * seg, hi = min(V, lo + seg);",
        "const int64_t lo = tid * seg, hi = min(V, lo + seg - 1);",
        "verify",
    ),
    (
        "verify: room for half the rejected tokens (shared overflow)",
        "kernels/tree.cu",
        "const size_t smem = sizeof(int64_t) * p.nodes;",
        "const size_t smem = sizeof(int64_t) * (p.nodes / 2);",
        "verify",
    ),
    (
        "draft loss backward: no barrier before the teacher terms",
        "kernels/draft_loss.cu",
        "  __syncthreads();  // every softmax term is written before the teacher terms are subtracted\n",
        "",
        "draft_loss",
    ),
    (
        "draft loss forward: threads leave before the block reduction's barrier",
        "kernels/draft_loss.cu",
        "  __syncthreads();\n  if (tid != 0) return;",
        "  if (tid != 0) return;\n  __syncthreads();",
        "draft_loss",
    ),
    (
        "draft loss forward: teacher entries strided by 33 (warp 0)",
        "kernels/draft_loss.cu",
        "for (int j = lane; j < p.k; j += 32) {",
        "for (int j = lane; j < p.k; j += 33) {",
        "draft_loss",
    ),
    (
        "topk: the row offset cut to 32 bits",
        "kernels/topk_lse.cu",
        "static_cast<const T*>(p.logits) + row * p.row_stride;",
        "static_cast<const T*>(p.logits) + static_cast<int>(row * p.row_stride);",
        "topk",
    ),
    (
        "verify: the logits row offset cut to 32 bits",
        "kernels/tree.cu",
        "static_cast<const T*>(p.logits) + (b * Tn + cur) * V;",
        "static_cast<const T*>(p.logits) + static_cast<int>((b * Tn + cur) * V);",
        "verify",
    ),
    (
        "attention: the kv offset cut to 32 bits",
        "kernels/tree.cu",
        "const T* k = static_cast<const T*>(p.k) + unit * S * D;",
        "const T* k = static_cast<const T*>(p.k) + static_cast<int>(unit * S * D);",
        "tree_attention",
    ),
    (
        "attention (tensor cores): the kv offset cut to 32 bits",
        "kernels/tree.cu",
        "const T* kg = static_cast<const T*>(p.k) + unit * p.seq * D;",
        "const T* kg = static_cast<const T*>(p.k) + static_cast<int>(unit * p.seq * D);",
        "tree_attention",
    ),
    (
        "checks: the root's parent is not checked",
        "kernels/tree.cu",
        "if (j == 0 ? a != -1 : (a < 0 || a >= j)) {",
        "if (j == 0 ? false : (a < 0 || a >= j)) {",
        "checks",
    ),
    (
        "checks: the tokens are not checked",
        "kernels/tree.cu",
        "if (tokens != nullptr && (tokens[j] < 0 || tokens[j] >= V)) {",
        "if (tokens != nullptr && (tokens[j] < 0 || tokens[j] > V)) {",
        "checks",
    ),
    (
        "checks: the LK bound lets a value just above it pass",
        "kernels/common.cu",
        "    if (v > limit) {",
        "    if (v > limit * 1.001f) {",
        "checks",
    ),
    (
        "launch: the shared-memory attribute set to each call's own size",
        "kernels/common.cu",
        "    if (raised().count({kernel, device}) == 0) {\n"
        "      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,\n"
        "                                 optin - static_cast<int>(attr.sharedSizeBytes));",
        "    if (true) {\n      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, "
        "static_cast<int>(dynamic));",
        "launch",
    ),
    (
        "pipeline: the destructor waits for the streams",
        "pipeline/nccl_comm.cpp",
        "  abort_locked();\n  for (auto& [ticket, op] : ops_) cudaEventDestroy(op.event);",
        "  abort_locked();\n  if (send_stream_ != nullptr) cudaStreamSynchronize(send_stream_);\n"
        "  for (auto& [ticket, op] : ops_) cudaEventDestroy(op.event);",
        "pipeline",
    ),
    (
        "pipeline: a failed ticket keeps its pooled event",
        "pipeline/nccl_comm.cpp",
        "    free_events_.push_back(op.event);  // not recorded on a channel stream: reusable\n",
        "",
        "pipeline",
    ),
    (
        "pipeline: a failed record after the operation was queued does not abort",
        "pipeline/nccl_comm.cpp",
        'fail(std::string("cudaEventRecord(channel stream): ") + cudaGetErrorString(err), false);',
        'throw std::runtime_error(std::string("cudaEventRecord(channel stream): ") + cudaGetErrorString(err));',
        "pipeline",
    ),
    (
        "pipeline: the communicator kept after ncclCommAbort",
        "pipeline/nccl_comm.cpp",
        "  const ncclResult_t r = ncclCommAbort(comm_);\n  comm_ = nullptr;\n",
        "  const ncclResult_t r = ncclCommAbort(comm_);\n",
        "pipeline",
    ),
    (
        "op layer: tree_attention launched on the legacy default stream",
        "ops/tree_ops.cpp",
        "return cuda::tree_attention(p, stream);",
        "return cuda::tree_attention(p, nullptr);",
        "op_layer",
    ),
    (
        "op layer: tree_attention validates on the host (a device-to-host copy)",
        "ops/tree_ops.cpp",
        "  if (q.is_cpu()) {  // CUDA: the kernel checks them\n    check_trees(par, op);",
        "  if (q.is_cpu() || true) {  // CUDA: the kernel checks them\n    check_trees(par.to(at::kCPU), op);",
        "op_layer",
    ),
    (
        "op layer: no device guard",
        "ops/dispatch.h",
        "  const CudaDeviceGuard guard(like.device());\n",
        "",
        "op_layer",
    ),
]

# The CI subset: (mutation, order, cases) - one order and one small case (CUEMU_CASES) that catch it.
QUICK = {
    "topk: the row offset cut to 32 bits": ("forward", "past 2^31 elements"),
    "attention (tensor cores): no barrier after a tile's copies land": (
        "forward",
        "bf16 B=3 Hq=8 Hkv=2 T=21 D=64 S=173 ",
    ),
    "verify: room for half the rejected tokens (shared overflow)": ("forward", "sampling f32 B=3 T=64 V=500"),
    "checks: the root's parent is not checked": ("forward", "no root"),
    "launch: the shared-memory attribute set to each call's own size": ("forward", ""),
    "op layer: tree_attention launched on the legacy default stream": ("forward", ""),
    "pipeline: the destructor waits for the streams": ("forward", ""),
}


def first_failure(text: str) -> str:
    for line in text.splitlines():
        if line.startswith(("cuemu: FAULT", "MISMATCH", "FAILED")):
            line = re.sub(r"\s+\[order \w+\]", "", line)
            return line[:150]
    return text.strip().splitlines()[-1][:150] if text.strip() else "?"


def run_family(driver: Path, family: str, order: str, cases: str, timeout: float) -> tuple[str, str, float]:
    """(kind, first failure, seconds) of one run."""
    began = time.monotonic()
    args = [str(driver)] if family in ("op_layer", "pipeline") else [str(driver), family]
    env = {**os.environ, "CUEMU_ORDERS": order, "CUEMU_CASES": cases}
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        code, out = -1, "timeout (a hang the emulator did not turn into a fault)"
    kind = {0: "missed", 1: "comparison", 3: "emulator fault", -1: "timeout"}.get(code, f"exit {code}")
    return kind, first_failure(out) if code else "", time.monotonic() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the mutations whose description holds this")
    parser.add_argument("--orders", default=",".join(ORDERS))
    parser.add_argument("--quick", action="store_true", help="the CI subset: one order and one case each")
    args = parser.parse_args()
    orders = args.orders.split(",")
    build_dir = ROOT / "build" / "cuda_emulator"  # shares the tests' object cache
    rows = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(ROOT / "csrc", copy / "csrc")
        for what, name, old, new, family in MUTATIONS:
            if args.only not in what or (args.quick and what not in QUICK):
                continue
            path = copy / "csrc" / name
            original = path.read_text()
            if original.count(old) != 1:
                raise SystemExit(f"mutation '{what}': the text to replace is not in {name} exactly once")
            path.write_text(original.replace(old, new))
            try:
                make = {"op_layer": build_op_layer, "pipeline": build_pipeline}.get(family, build)
                driver = make(root=copy, build_dir=build_dir)
                runs = [QUICK[what]] if args.quick else [(order, "") for order in orders]
                results = []
                for order, cases in runs:
                    results.append((order, *run_family(driver, family, order, cases, 120 if args.quick else 900)))
                    print(
                        f"{what} [{order}]: {results[-1][1]} {results[-1][2]} ({results[-1][3]:.0f} s)", file=sys.stderr
                    )
                    if family in ("op_layer", "pipeline"):
                        break  # one run: these tests run no kernels whose thread order could vary
            finally:
                path.write_text(original)
            rows.append((what, family, results))
    shown = ["order"] if args.quick else orders
    print("| mutation | family | " + " | ".join(shown) + " | first report |")
    print("|---|---|" + "---|" * len(shown) + "---|")
    for what, family, results in rows:
        cells = [kind for _, kind, _, _ in results] if not args.quick else [f"{results[0][0]}: {results[0][1]}"]
        if family in ("op_layer", "pipeline") and not args.quick:
            cells += ["-"] * (len(shown) - len(cells))
        report = next((msg for _, kind, msg, _ in results if msg), "")
        print(f"| {what} | {family} | " + " | ".join(cells) + f" | {report.replace('|', '/')} |")
    missed = [what for what, _, results in rows if all(kind == "missed" for _, kind, _, _ in results)]
    print(f"\n{len(rows)} mutations in {time.monotonic() - began:.0f} s", file=sys.stderr)
    if missed:
        print(f"not caught: {missed}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
