"""How ``bench peers-train`` measures a trained draft: its acceptance length on the validation prompts
(to pick SpecForge's learning rate) and ``eval`` on the standard sets, with the report's cells for it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torchspec_ext.bench.peers_context import MODES, SETS, Context
from torchspec_ext.bench.report import Column, fmt_fixed


def harness_modes(family, depth: int, topk: int, max_nodes: int) -> dict:
    """The report's two modes in ``family``'s shapes: "chain" (EAGLE-3's chain of ``depth``, a block
    draft's whole block: its published verification) and "tree"."""
    shaped = family.decode_modes(depth, topk, max_nodes, 0.0)
    return dict(zip(MODES, (next(iter(shaped.values())), shaped["tree"])))


def validation_acceptance(context: Context, directory: Path, new_tokens: int) -> float:
    """Greedy chain acceptance length of the draft in ``directory`` on the validation prompts."""
    from torchspec_ext import drafts
    from torchspec_ext.eval import acceptance_lengths
    from torchspec_ext.target import stop_token_ids

    family, draft = drafts.load_draft(directory, context.target)
    eos = stop_token_ids(context.target, context.batches.tokenizer)
    config = context.run.config
    chain = {"chain": harness_modes(family, config.eval_depth, config.eval_tree_topk, config.eval_tree_nodes)["chain"]}
    return acceptance_lengths(context.target, family, draft, context.validation, new_tokens, chain, eos)["chain"]


def evaluate(context: Context, directory: Path, name: str) -> dict:
    """``eval`` of the draft in ``directory`` on the standard sets (chain and tree), written beside it
    as ``eval.json``; returns {(set, mode): row}."""
    from torchspec_ext import drafts
    from torchspec_ext import eval as evaluation

    args, s = context.args, context.settings
    argv = ["--draft", str(directory), "--prompts", *SETS, "--limit", str(s.limit)]
    argv += ["--max-new-tokens", str(s.max_new_tokens), "--seed", str(context.seed), "--dtype", args.target_dtype]
    argv += ["--target", args.target] * bool(args.target) + ["--data", args.data] * bool(args.data)
    eval_args = evaluation.parse_args(argv)
    family = drafts.family_of_config(json.loads((directory / "config.json").read_text()), directory)
    modes = harness_modes(family, eval_args.depth, eval_args.topk, eval_args.max_nodes)
    print(f"[bench peers-train] eval: {name} ({directory})", file=sys.stderr)
    report = evaluation.evaluate(eval_args, modes)
    (directory / "eval.json").write_text(json.dumps(report, indent=2, default=str))
    return {(row["set"], row["mode"]): row for row in report["sets"]}


def eval_cells(results: dict) -> dict:
    """A row's cells of an eval: acceptance length per set and mode, tree speed-up per set."""
    cells = {}
    for name in SETS:
        for mode in MODES:
            cells[f"{name} {mode}"] = results.get((name, mode), {}).get("acceptance_length")
        cells[f"{name} speed-up"] = results.get((name, "tree"), {}).get("speedup")
    return cells


def eval_columns() -> list[Column]:
    columns = [Column(f"{name} {mode}", f"{name} {mode} AL", fmt_fixed(2)) for name in SETS for mode in MODES]
    return columns + [Column(f"{name} speed-up", f"{name} tree speed-up", fmt_fixed(2, "x")) for name in SETS]
