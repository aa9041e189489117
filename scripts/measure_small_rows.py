#!/usr/bin/env python3
"""What a verification forward of T tree nodes costs, with the target's Linear layers as PyTorch runs
them and as ``torchspec_ext.small_rows`` runs them (the faster of ``x @ W.T`` and ``(W @ x.T).T``,
measured per weight shape and row count). One request, ``--prefix`` tokens in its KV cache.

It prints the floor beside each: a forward reads every weight once (bytes / the rate at which a sum
reads the LM head) and does 2 * parameters * T FLOPs (at the best GEMM rate measured here). Rounds of the
two ways alternate, so a slow spell of the machine hits both; each cell is the median over rounds.

Usage: python scripts/measure_small_rows.py [--target DIR] [--prefix 256] [--nodes 1,2,3,5,9,17]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure_batched_verification import forward_ms, tree_parents  # noqa: E402


def gemm_rates(weight: torch.Tensor) -> tuple[float, float]:
    """(GB/s reading ``weight`` in a sum, the memory's rate; GFLOP/s multiplying 64 rows), best of 5."""
    from torchspec_ext.small_rows import best_seconds

    read = best_seconds(weight.sum, repeats=5)
    x = torch.randn(64, weight.shape[1])
    many = best_seconds(lambda: torch.nn.functional.linear(x, weight), repeats=5)
    return weight.numel() * weight.element_size() / read / 1e9, 2 * weight.numel() * 64 / many / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=None, help="a Hugging Face causal-LM directory (default: SmolLM2-135M)")
    parser.add_argument("--prefix", type=int, default=256, help="cached tokens")
    parser.add_argument("--nodes", default="1,2,3,4,5,9,17", help="tree sizes T, the root included")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7, help="forwards per cell and round")
    args = parser.parse_args()

    from torchspec_ext.small_rows import SmallRowsLinear, enable_small_rows
    from torchspec_ext.speculate import _cache_keyword, enable_tree_attention
    from torchspec_ext.target import load_target

    target, _ = load_target(args.target, torch.float32)
    enable_tree_attention(target)
    cache_kw = _cache_keyword(target)
    nodes = [int(n) for n in args.nodes.split(",")]
    params = sum(p.numel() for p in target.parameters())
    linears = [m for m in target.modules() if isinstance(m, torch.nn.Linear)]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    with torch.no_grad():
        bandwidth, gflops = gemm_rates(target.get_output_embeddings().weight)
        enable_small_rows(target)
        for T in nodes:  # the one-off measurements of small_rows, before any timing
            forward_ms(target, cache_kw, 1, args.prefix, tree_parents(T), 1)
        cells = {(way, T): [] for way in ("usual", "small_rows") for T in nodes}
        for _ in range(args.rounds):
            for way in ("usual", "small_rows"):
                for m in linears:
                    m.__class__ = SmallRowsLinear if way == "small_rows" else torch.nn.Linear
                for T in nodes:
                    cells[way, T].append(forward_ms(target, cache_kw, 1, args.prefix, tree_parents(T), args.repeats))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"# one verification forward, {machine}, {torch.get_num_threads()} torch threads, float32, "
          f"prefix {args.prefix}, median of {args.rounds} rounds of {args.repeats}\n")  # fmt: skip
    print(f"Linear weights {weight_bytes / 1e6:.0f} MB, {params / 1e6:.0f} M parameters; the LM head "
          f"summed at {bandwidth:.1f} GB/s, best GEMM rate {gflops:.0f} GFLOP/s (64 rows)\n")  # fmt: skip
    print("| T (nodes) | usual, ms | small_rows, ms | small_rows / usual | floor, ms (max of bytes, FLOPs) |")
    print("|---|---|---|---|---|")
    for T in nodes:
        usual, small = statistics.median(cells["usual", T]), statistics.median(cells["small_rows", T])
        floor = max(weight_bytes / bandwidth / 1e6, 2 * params * T / gflops / 1e6)
        print(f"| {T} | {usual:.1f} | {small:.1f} | {small / usual:.2f} | {floor:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
