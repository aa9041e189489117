"""Where speculative decoding and plain decoding part, per dtype.

Plain greedy decoding scores one token a forward (T = 1, the KV cache, the model's SDPA attention);
verification scores several at once. On the plain output of each prompt this part scores the same
tokens again in chunks of ``depth + 1`` (a chain's verification) two ways: (a) through the model's
own attention (SDPA, causal), (b) as a chain tree through ``tree_attention`` (what
``speculate`` runs), and counts, per dtype, the positions whose argmax is not plain decoding's
token ("flips"), the largest logit difference from plain decoding's, and the plain logits' margin
(top-1 minus top-2) at each flip: a flip where the margin is below the dtype's rounding is a near
tie, decided by the order of a sum, not by the draft.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from torchspec_ext.bench.report import Column, Report, fmt_fixed, fmt_num


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", nargs="+", default=["mt-bench"], help="prompt sets (as eval's --prompts)")
    parser.add_argument("--limit", type=int, default=None, help="prompts per set (default 8; quick: 2)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="per prompt (default 64; quick: 16)")
    parser.add_argument("--depth", type=int, default=4, help="the chain's draft tokens: chunks of depth + 1")
    parser.add_argument("--target", default=None)


@torch.no_grad()
def chunk_logits(model, ids: list[int], start: int, chunk: int, tree: bool) -> torch.Tensor:
    """Float32 logits predicting ``ids[start + 1:]`` (the prefix ``ids[:start]`` prefilled), scored in
    chunks of ``chunk`` tokens from ``ids[start]`` on: by the model's attention, or as chain trees."""
    from transformers import DynamicCache

    from torchspec_ext.speculate import _cache_keyword, _score_tree

    cache, keyword = DynamicCache(), _cache_keyword(model)
    model(torch.tensor([ids[:start]]), use_cache=True, **{keyword: cache})
    out = []
    for begin in range(start, len(ids) - 1, chunk):
        tokens = torch.tensor(ids[begin : min(begin + chunk, len(ids) - 1)])
        if tree:
            parents = torch.arange(-1, len(tokens) - 1)
            logits = _score_tree(model, tokens, parents, begin, False, {keyword: cache}).logits[0]
        else:
            positions = torch.arange(begin, begin + len(tokens))[None]
            logits = model(tokens[None], position_ids=positions, use_cache=True, **{keyword: cache}).logits[0]
        out.append(logits.float())
    return torch.cat(out)


def compare(plain: torch.Tensor, other: torch.Tensor, want: list[int], margins: torch.Tensor) -> dict:
    """Flips of ``other``'s argmax against the plain tokens ``want``, its largest logit difference,
    and the plain margins at the flips."""
    flips = (other.argmax(-1) != torch.tensor(want)).nonzero().flatten()
    return {
        "flips": len(flips),
        "max_diff": float((other - plain).abs().max()),
        "margins": margins[flips].tolist(),
    }


def run(args: Any) -> Report:
    from torchspec_ext.evalsets import load_prompt_sets, turn_prompt
    from torchspec_ext.options import DTYPES
    from torchspec_ext.speculate import enable_tree_attention
    from torchspec_ext.target import load_target, stop_token_ids

    limit = args.limit or (2 if args.quick else 8)
    new_tokens = args.max_new_tokens or (16 if args.quick else 64)
    target, tokenizer = load_target(args.target)
    eos = stop_token_ids(target, tokenizer)
    sets = load_prompt_sets(args.prompts, tokenizer, limit=limit, max_prompt_tokens=256)
    prompts = [turn_prompt(tokenizer, item) for s in sets for item in s.items]
    header = {
        "target": args.target or "SmolLM2-135M-Instruct (default)",
        "prompts": f"{len(prompts)} first turns of {', '.join(args.prompts)}, up to {new_tokens} greedy tokens each",
        "chunks": f"{args.depth + 1} tokens (a chain of {args.depth} draft tokens and its root)",
        "threads": torch.get_num_threads(),
    }
    report = Report(
        "lossless",
        header,
        [
            Column("dtype", "dtype"),
            Column("path", "scored as"),
            Column("positions", "positions"),
            Column("flips", "argmax not plain's"),
            Column("max_diff", "max |logit - plain's|", fmt_num(3)),
            Column("median_margin", "median plain margin at a flip", fmt_num(3)),
            Column("max_margin", "largest plain margin at a flip", fmt_num(3)),
            Column("ulp", "bf16 / f32 rounding at the logits' scale", fmt_fixed(4)),
        ],
    )
    for dtype in ("float32", "bfloat16"):
        model = target.to(DTYPES[dtype])
        enable_tree_attention(model)
        totals = {name: {"flips": 0, "max_diff": 0.0, "margins": []} for name in ("model attention", "tree_attention")}
        positions, scale = 0, 0.0
        for prompt in prompts:
            with torch.no_grad():
                plain = model.generate(
                    torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                    pad_token_id=eos[0], output_logits=True, return_dict_in_generate=True,
                )  # fmt: skip
            want = plain.sequences[0, len(prompt) :].tolist()
            if len(want) < 2:
                continue
            plain_logits = torch.stack(plain.logits)[:, 0].float()[: len(want)]  # the T = 1 path's logits
            top2 = plain_logits.topk(2, -1).values
            margins = top2[:, 0] - top2[:, 1]
            ids = prompt + want
            for name, tree in (("model attention", False), ("tree_attention", True)):
                other = chunk_logits(model, ids, len(prompt) - 1, args.depth + 1, tree)[: len(want)]
                found = compare(plain_logits, other, want, margins)
                totals[name]["flips"] += found["flips"]
                totals[name]["max_diff"] = max(totals[name]["max_diff"], found["max_diff"])
                totals[name]["margins"] += found["margins"]
            positions += len(want)
            scale = max(scale, float(top2[:, 0].abs().max()))
        eps = torch.finfo(DTYPES[dtype]).eps
        for name, t in totals.items():
            report.rows.append(
                {
                    "dtype": dtype,
                    "path": f"chunks, {name}",
                    "positions": positions,
                    "flips": t["flips"],
                    "max_diff": t["max_diff"],
                    "median_margin": statistics.median(t["margins"]) if t["margins"] else None,
                    "max_margin": max(t["margins"]) if t["margins"] else None,
                    "ulp": eps * scale,
                }
            )
    return report
