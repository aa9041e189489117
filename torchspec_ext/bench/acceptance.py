"""Acceptance length of a trained draft: as a chain and as trees of several sizes, in one run.

Runs :func:`torchspec_ext.eval.evaluate` (plain decoding, then each speculative mode on the same
held-out prompts, greedy) with one tree per ``--tree-nodes`` size. Acceptance length = tokens
emitted per target forward (plain decoding: 1). Without ``--draft`` it measures the trainer's
default output, ``torchspec_out/draft``, and is skipped when there is none.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torchspec_ext.bench.common import Skipped
from torchspec_ext.bench.report import Column, Report, fmt_fixed, fmt_num

DEFAULT_DRAFT = Path("torchspec_out") / "draft"  # python -m torchspec_ext.train's default output-dir/draft


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--draft",
        default=None,
        metavar="DIR",
        help=f"a draft directory written by python -m torchspec_ext.train (default: {DEFAULT_DRAFT})",
    )
    parser.add_argument(
        "--tree-nodes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[4, 8, 16, 32],
        help="max_nodes of the trees, comma-separated (default 4,8,16,32)",
    )
    parser.add_argument("--depth", type=int, default=6, help="chain length and tree depth")
    parser.add_argument("--tree-topk", type=int, default=6, help="children per tree node")
    parser.add_argument("--prompts", type=int, default=None, help="held-out prompts (default 3; quick: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="per prompt (default 48; quick: 16)")


def run(args: Any) -> Report:
    from torchspec_ext import eval as evaluation
    from torchspec_ext.speculate import TreeSpec

    draft = args.draft or str(DEFAULT_DRAFT)
    if args.draft is None and not DEFAULT_DRAFT.is_dir():
        raise Skipped(
            f"no --draft given and no {DEFAULT_DRAFT} here: train one with `python -m torchspec_ext.train` "
            "(writes torchspec_out/draft), or pass --draft DIR"
        )
    prompts = args.prompts or (1 if args.quick else 3)
    new_tokens = args.max_new_tokens or (16 if args.quick else 48)
    # The eval module's own option parsing and checks; the draft is checked before the target loads.
    eval_args = evaluation.parse_args(
        [
            "--draft",
            draft,
            "--prompts",
            "sharegpt",
            "--limit",
            str(prompts),
            "--max-new-tokens",
            str(new_tokens),
            "--depth",
            str(args.depth),
            "--topk",
            str(args.tree_topk),
        ]
    )
    modes = {"chain": TreeSpec.chain(args.depth)}
    modes |= {f"tree {n}": TreeSpec(args.depth, args.tree_topk, n) for n in args.tree_nodes}
    result = evaluation.evaluate(eval_args, modes)
    header = {
        "draft": result["header"]["draft"],
        "target": result["header"]["target"],
        "device": "cpu (the eval module's)",
        "prompts": f"{prompts} held-out, up to {new_tokens} new tokens, greedy",
        "trees": f"depth {args.depth}, {args.tree_topk} children per node, at most max_nodes draft nodes",
    }
    columns = [
        Column("mode", "mode"),
        Column("max_nodes", "draft nodes"),
        Column("tokens", "tokens"),
        Column("target_forwards", "target forwards"),
        Column("acceptance_length", "acceptance length", fmt_fixed(2)),
        Column("tokens_per_s", "tokens/s", fmt_num()),
        Column("speedup", "speed-up", fmt_fixed(2, "x")),
    ]
    return Report("acceptance", header, columns, result["rows"])
