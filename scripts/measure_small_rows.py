#!/usr/bin/env python3
"""What a verification forward of T tree nodes costs, with the target's Linear layers as PyTorch runs
them and as ``torchspec_ext.small_rows`` runs them: the fastest of ``x @ W.T``, ``(W @ x.T).T`` and
the ``small_rows_linear`` kernel, measured per weight shape and row count; and, to show what the
kernel adds, the same without it. One request, ``--prefix`` tokens in its KV cache.

It prints the floor beside each: a forward reads every weight once (bytes / the rate at which a sum
reads the LM head) and does 2 * parameters * T FLOPs (at the best GEMM rate measured here). Rounds of the
two ways alternate, so a slow spell of the machine hits both; each cell is the median over rounds.

Usage: python scripts/measure_small_rows.py [--target DIR] [--dtype float32] [--prefix 256] [--nodes 1,2,3,5,9,17]
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
    x = torch.randn(64, weight.shape[1], dtype=weight.dtype)
    many = best_seconds(lambda: torch.nn.functional.linear(x, weight), repeats=5)
    return weight.numel() * weight.element_size() / read / 1e9, 2 * weight.numel() * 64 / many / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=None, help="a Hugging Face causal-LM directory (default: SmolLM2-135M)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--prefix", type=int, default=256, help="cached tokens")
    parser.add_argument("--nodes", default="1,2,3,4,5,9,17", help="tree sizes T, the root included")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7, help="forwards per cell and round")
    args = parser.parse_args()

    from torchspec_ext import small_rows
    from torchspec_ext.small_rows import SmallRowsLinear, enable_small_rows
    from torchspec_ext.speculate import _cache_keyword, enable_tree_attention
    from torchspec_ext.target import load_target

    dtype = getattr(torch, args.dtype)
    target, _ = load_target(args.target, dtype)
    enable_tree_attention(target)
    cache_kw = _cache_keyword(target)
    nodes = [int(n) for n in args.nodes.split(",")]
    params = sum(p.numel() for p in target.parameters())
    linears = [m for m in target.modules() if isinstance(m, torch.nn.Linear)]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    with torch.no_grad():
        bandwidth, gflops = gemm_rates(target.get_output_embeddings().weight)
        enable_small_rows(target)
        ways = ("usual", "no kernel", "small_rows")
        choices = {}  # way -> small_rows' table of the fastest ways, measured with or without the kernel
        for way, kernel_dtypes in (("no kernel", ()), ("small_rows", small_rows.KERNEL_DTYPES)):
            small_rows._fastest, small_rows.KERNEL_DTYPES = {}, kernel_dtypes
            for T in nodes:  # the one-off measurements of small_rows, before any timing
                forward_ms(target, cache_kw, 1, args.prefix, tree_parents(T), 1)
            choices[way] = small_rows._fastest
        cells = {(way, T): [] for way in ways for T in nodes}
        for _ in range(args.rounds):
            for way in ways:
                for m in linears:
                    m.__class__ = torch.nn.Linear if way == "usual" else SmallRowsLinear
                small_rows._fastest = choices.get(way, {})
                for T in nodes:
                    cells[way, T].append(forward_ms(target, cache_kw, 1, args.prefix, tree_parents(T), args.repeats))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"# one verification forward, {machine}, {torch.get_num_threads()} torch threads, {args.dtype}, "
          f"prefix {args.prefix}, median of {args.rounds} rounds of {args.repeats}\n")  # fmt: skip
    print(f"Linear weights {weight_bytes / 1e6:.0f} MB, {params / 1e6:.0f} M parameters; the LM head "
          f"summed at {bandwidth:.1f} GB/s, best GEMM rate {gflops:.0f} GFLOP/s (64 rows)\n")  # fmt: skip
    print("| T (nodes) | usual, ms | small_rows without the kernel, ms | small_rows, ms | small_rows / usual "
          "| floor, ms (max of bytes, FLOPs) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for T in nodes:
        usual, swapped, small = (statistics.median(cells[way, T]) for way in ways)
        floor = max(weight_bytes / bandwidth / 1e6, 2 * params * T / gflops / 1e6)
        print(f"| {T} | {usual:.1f} | {swapped:.1f} | {small:.1f} | {small / usual:.2f} | {floor:.1f} |")
    kernel_share = sum(way == "kernel" for way in choices["small_rows"].values()) / max(1, len(choices["small_rows"]))
    print(f"\nThe kernel won {kernel_share:.0%} of the (weight shape, rows) pairs measured.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
