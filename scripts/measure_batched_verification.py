#!/usr/bin/env python3
"""Would serving batch concurrent requests into one verification forward? Measured on the target.

For B requests, each with ``--prefix`` tokens in its KV cache and a tree of T nodes to verify (T = 1:
a plain decoding step; 5: a chain of 4 draft tokens after the root; 17: a tree of 16 draft nodes),
times one forward over the B trees stacked ([B, T], tree attention, one cache of B rows) against B
forwards of one tree each, the way ``serve`` runs them today. The batched case is the best batching
can do: every row has the same prefix length, so no row pads. Batching pays where ``batched / B
separate`` is well under 1.

Usage: python scripts/measure_batched_verification.py [--target DIR] [--dtype float32] [--prefix 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def tree_parents(nodes: int) -> list[int]:
    """A chain for up to 5 nodes (what prompt lookup and a pruned tree verify), else a root then a 4-ary
    tree breadth first (node j's parent is (j - 1) // 4)."""
    if nodes <= 5:
        return [-1] + list(range(nodes - 1))
    return [-1] + [(j - 1) // 4 for j in range(1, nodes)]


def forward_ms(target, cache_kw: str, rows: int, prefix: int, parents: list[int], repeats: int) -> float:
    """Median ms of one verification forward over ``rows`` trees after ``prefix`` cached tokens each."""
    from transformers import DynamicCache

    from torchspec_ext.speculate import _commit_path, _tree_depths

    vocab = target.config.vocab_size
    generator = torch.Generator().manual_seed(rows * 1000 + len(parents))
    cache = DynamicCache()
    prompt = torch.randint(0, vocab, (rows, prefix), generator=generator)
    target(prompt, use_cache=True, **{cache_kw: cache})
    tokens = torch.randint(0, vocab, (rows, len(parents)), generator=generator)
    tree = torch.tensor(parents)[None].expand(rows, -1)
    positions = (prefix + _tree_depths(tree[0]))[None].expand(rows, -1)
    lens = torch.full((rows,), prefix)
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        begin = time.perf_counter()
        target(tokens, position_ids=positions, use_cache=True, output_hidden_states=True, tree_parents=tree,
               tree_prefix_lens=lens, **{cache_kw: cache})  # fmt: skip
        times.append((time.perf_counter() - begin) * 1e3)
        _commit_path(cache, prefix, torch.empty(0, dtype=torch.long))  # back to the prefix alone
    return statistics.median(times[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=None, help="a Hugging Face causal-LM directory (default: SmolLM2-135M)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--prefix", type=int, default=256, help="cached tokens per request")
    parser.add_argument("--nodes", default="1,5,17", help="tree sizes T, the root included")
    parser.add_argument("--rows", default="2,4", help="concurrent requests B")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from torchspec_ext.speculate import _cache_keyword, enable_tree_attention
    from torchspec_ext.target import load_target

    target, _ = load_target(args.target, getattr(torch, args.dtype))
    enable_tree_attention(target)
    cache_kw = _cache_keyword(target)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"# batched verification, {machine}, {torch.get_num_threads()} torch threads, {args.dtype}, "
          f"prefix {args.prefix} tokens per request\n")  # fmt: skip
    print("| T (nodes per tree) | B (requests) | one forward over B trees, ms | B forwards of one tree, ms "
          "| batched / separate |")  # fmt: skip
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for nodes in map(int, args.nodes.split(",")):
            parents = tree_parents(nodes)
            single = forward_ms(target, cache_kw, 1, args.prefix, parents, args.repeats)
            for rows in map(int, args.rows.split(",")):
                batched = forward_ms(target, cache_kw, rows, args.prefix, parents, args.repeats)
                print(f"| {nodes} | {rows} | {batched:.1f} | {rows * single:.1f} | {batched / (rows * single):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
