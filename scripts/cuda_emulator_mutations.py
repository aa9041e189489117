#!/usr/bin/env python3
"""Bugs planted in the CUDA kernels, one at a time, that the emulator test must catch.

Each mutation edits one file of a copy of csrc/, builds the emulator test against it (only what
the edit touches is recompiled; objects are cached in build/cuda_emulator_mutations/) and runs the
kernel's family once per thread order. A run is "caught" when it fails; the table says by what:
a fault of the emulator (deadlock, divergence, overflow ...) or a comparison with the CPU twin.
Prints a markdown table (docs/cuda_emulator.md holds the last one).

Usage: python scripts/cuda_emulator_mutations.py [--only SUBSTRING] [--orders forward,reverse,...]
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
from cuda_emulator_build import build  # noqa: E402

ORDERS = ["forward", "reverse", "random", "eager"]

# (what, file under csrc/kernels, text, replacement, family)
MUTATIONS = [
    (
        "topk: no barrier between the histogram and its scan (compact)",
        "topk_lse.cu",
        "      if ((key & mask) == prefix) atomicAdd(&st.hist[(key >> shift) & 255], 1);\n"
        "    }\n    __syncthreads();\n",
        "      if ((key & mask) == prefix) atomicAdd(&st.hist[(key >> shift) & 255], 1);\n    }\n",
        "topk",
    ),
    (
        "topk: no barrier before the next tile adds to the count",
        "topk_lse.cu",
        "    __syncthreads();  // every thread has read count before the next tile adds to it\n",
        "",
        "topk",
    ),
    (
        "topk: the slot broadcast under a lane condition (offer)",
        "topk_lse.cu",
        "  base = __shfl_sync(0xFFFFFFFFu, base, 0);",
        "  if (lane < 16) base = __shfl_sync(0xFFFFFFFFu, base, 0);",
        "topk",
    ),
    (
        "topk: head (unaligned elements) one too many",
        "topk_lse.cu",
        "((16 - (addr & 15)) & 15) / sizeof(T)))",
        "((16 - (addr & 15)) & 15) / sizeof(T) + 1))",
        "topk",
    ),
    (
        "topk: candidate buffer half a tile short (shared overflow)",
        "topk_lse.cu",
        "const int capacity = p.k + 2 * kTile + 32;",
        "const int capacity = p.k + kTile / 2 + 32;",
        "topk",
    ),
    (
        "warp_sum skips its last shuffle step",
        "cuda_common.cuh",
        "  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, d);",
        "  for (int d = 16; d > 1; d >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, d);",
        "tree_attention",
    ),
    (
        "attention: no barrier before a key tile is overwritten",
        "tree.cu",
        "    __syncthreads();  // the previous tile's keys, values, probabilities and masks are consumed\n",
        "",
        "tree_attention",
    ),
    (
        "attention: no __syncwarp before P @ V reads the probabilities",
        "tree.cu",
        "    __syncwarp();  // the warp's probabilities are written\n",
        "",
        "tree_attention",
    ),
    (
        "attention: the row maximum under a lane condition",
        "tree.cu",
        "      const float m_new = fmaxf(m[i], warp_max(s));",
        "      const float m_new = fmaxf(m[i], lane < n ? warp_max(s) : s);",
        "tree_attention",
    ),
    (
        "attention: the tree tiles stop before tile 0 (off by one)",
        "tree.cu",
        "for (int64_t t0 = last / kKeyTile * kKeyTile; t0 >= 0; t0 -= kKeyTile) {",
        "for (int64_t t0 = last / kKeyTile * kKeyTile; t0 > 0; t0 -= kKeyTile) {",
        "tree_attention",
    ),
    (
        "attention: one node too many in the last tile (off by one)",
        "tree.cu",
        "const int nodes = static_cast<int>(min(tile_nodes, T_ - j0));",
        "const int nodes = static_cast<int>(min(tile_nodes, T_ - j0 + 1));",
        "tree_attention",
    ),
    (
        "attention: no room for the node masks (shared overflow)",
        "tree.cu",
        "kAttnWarps * kRowsPerWarp * kKeyTile + nodes);",
        "kAttnWarps * kRowsPerWarp * kKeyTile);",
        "tree_attention",
    ),
    (
        "verify: no barrier before thread 0 rewrites the walk's state",
        "tree.cu",
        "    __syncthreads();  // every thread has read the state before thread 0 changes it\n",
        "",
        "verify",
    ),
    (
        "verify: the argmax reduction's shuffle under a lane condition",
        "tree.cu",
        "    const uint64_t o = __shfl_xor_sync(0xFFFFFFFFu, key, d);",
        "    const uint64_t o = (threadIdx.x & 1) ? __shfl_xor_sync(0xFFFFFFFFu, key, d) : key;",
        "verify",
    ),
    (
        "verify: each segment of the final draw one token short (off by one)",
        "tree.cu",
        "const int64_t lo = tid * seg, hi = min(V, lo + seg);",
        "const int64_t lo = tid * seg, hi = min(V, lo + seg - 1);",
        "verify",
    ),
    (
        "verify: room for half the rejected tokens (shared overflow)",
        "tree.cu",
        "const size_t smem = sizeof(int64_t) * p.nodes;",
        "const size_t smem = sizeof(int64_t) * (p.nodes / 2);",
        "verify",
    ),
    (
        "draft loss backward: no barrier before the teacher terms",
        "draft_loss.cu",
        "  __syncthreads();  // every softmax term is written before the teacher terms are subtracted\n",
        "",
        "draft_loss",
    ),
    (
        "draft loss forward: threads leave before the block reduction's barrier",
        "draft_loss.cu",
        "  __syncthreads();\n  if (tid != 0) return;",
        "  if (tid != 0) return;\n  __syncthreads();",
        "draft_loss",
    ),
    (
        "draft loss forward: teacher entries strided by 33 (warp 0)",
        "draft_loss.cu",
        "for (int j = lane; j < p.k; j += 32) {",
        "for (int j = lane; j < p.k; j += 33) {",
        "draft_loss",
    ),
]


def first_failure(text: str) -> str:
    for line in text.splitlines():
        if line.startswith(("cuemu: FAULT", "MISMATCH", "FAILED")):
            line = re.sub(r"\s+\[order \w+\]", "", line)
            return line[:150]
    return text.strip().splitlines()[-1][:150] if text.strip() else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the mutations whose description holds this")
    parser.add_argument("--orders", default=",".join(ORDERS))
    args = parser.parse_args()
    orders = args.orders.split(",")
    build_dir = ROOT / "build" / "cuda_emulator_mutations"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(ROOT / "csrc", copy / "csrc")
        for what, name, old, new, family in MUTATIONS:
            if args.only not in what:
                continue
            path = copy / "csrc" / "kernels" / name
            original = path.read_text()
            if original.count(old) != 1:
                raise SystemExit(f"mutation '{what}': the text to replace is not in {name} exactly once")
            path.write_text(original.replace(old, new))
            try:
                driver = build(root=copy, build_dir=build_dir)
                results = []
                for order in orders:
                    began = time.monotonic()
                    try:
                        done = subprocess.run(
                            [str(driver), family],
                            capture_output=True,
                            text=True,
                            timeout=900,
                            env={**os.environ, "CUEMU_ORDERS": order},
                        )
                        code, out = done.returncode, done.stdout + done.stderr
                    except subprocess.TimeoutExpired:
                        code, out = -1, "timeout (a hang the emulator did not turn into a fault)"
                    kind = {0: "missed", 1: "comparison", 3: "emulator fault", -1: "timeout"}.get(code, f"exit {code}")
                    results.append((order, kind, first_failure(out) if code else "", time.monotonic() - began))
                    print(f"{what} [{order}]: {kind} {results[-1][2]} ({results[-1][3]:.0f} s)", file=sys.stderr)
            finally:
                path.write_text(original)
            rows.append((what, family, results))
    print("| mutation | family | " + " | ".join(orders) + " | first report |")
    print("|---|---|" + "---|" * len(orders) + "---|")
    for what, family, results in rows:
        cells = [kind for _, kind, _, _ in results]
        report = next((msg for _, kind, msg, _ in results if msg), "")
        print(f"| {what} | {family} | " + " | ".join(cells) + f" | {report.replace('|', '/')} |")
    missed = [what for what, _, results in rows if all(kind == "missed" for _, kind, _, _ in results)]
    if missed:
        print(f"\nnot caught under any order: {missed}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
