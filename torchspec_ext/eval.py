"""``python -m torchspec_ext.eval``: a draft's real acceptance length and speed-up.

On held-out prompts, the target decodes plainly (greedy, or sampling at --temperature) and
speculatively with the draft, as a chain and as a dynamic tree, in the same run; the table
gives the acceptance length (mean tokens emitted per target forward) and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from torchspec_ext.data import load_conversations, short_prompts, split_held_out
from torchspec_ext.draft import CONFIG_NAME, WEIGHTS_NAME, DraftConfig, Eagle3Draft, Eagle3Drafter
from torchspec_ext.speculate import TargetAsDraft, TreeSpec, speculative_generate
from torchspec_ext.target import load_target


def held_out_prompts(tokenizer, data_path, count: int, max_prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """The first user turn of held-out conversations, in the target's chat template."""
    conversations, _ = load_conversations(data_path)
    _, held_out = split_held_out(conversations, 0.02, seed=seed)
    return short_prompts(held_out, tokenizer, count, max_prompt_tokens)


def check_draft_spec(spec: str) -> None:
    """Fails fast (before the target loads) on a --draft that is neither 'target' nor a draft directory."""
    if spec == "target":
        return
    path = Path(spec)
    if not ((path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()):
        raise SystemExit(f"torchspec_ext.eval: cannot load draft {spec!r}: not an EAGLE-3 draft directory (expected "
                         f"{CONFIG_NAME} and {WEIGHTS_NAME}: python -m torchspec_ext.train's output-dir/draft, a "
                         "checkpoint, or python -m torchspec_ext.export's output), nor 'target'")


def load_draft(spec: str, target):
    """'target' (the target as its own draft) or a trained / exported EAGLE-3 draft directory."""
    if spec == "target":
        return TargetAsDraft(target)
    check_draft_spec(spec)
    t, error = target.config, f"torchspec_ext.eval: cannot load draft {spec!r}"
    try:
        c = DraftConfig.from_hf(json.loads((Path(spec) / CONFIG_NAME).read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{error}: unreadable {CONFIG_NAME} ({type(exc).__name__}: {exc})") from None
    if c.vocab_size != t.vocab_size or c.hidden_size != t.hidden_size \
            or any(not 0 <= i <= t.num_hidden_layers for i in c.feature_layers):
        raise SystemExit(f"{error}: it was made for another target (vocab {c.vocab_size}, hidden {c.hidden_size}, "
                         f"feature layers {c.feature_layers}; the target has vocab {t.vocab_size}, hidden "
                         f"{t.hidden_size}, {t.num_hidden_layers} layers)")
    try:
        draft = Eagle3Draft.load(spec, target)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"{error}: {exc}") from None
    device = next(target.parameters()).device
    return Eagle3Drafter(draft.to(device))


@torch.no_grad()
def plain_decode(model, prompt, max_new_tokens, temperature, eos):
    kwargs = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
    start = time.perf_counter()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, eos_token_id=eos, **kwargs)
    return out.shape[1] - len(prompt), time.perf_counter() - start


def decode_modes(args) -> dict[str, TreeSpec]:
    """The speculative modes of one evaluation: a chain of --depth and a tree of --depth/--topk/--max-nodes."""
    return {"chain": TreeSpec.chain(args.depth), "tree": TreeSpec(args.depth, args.topk, args.max_nodes)}


def evaluate(args, modes: dict[str, TreeSpec] | None = None) -> dict:
    """Plain decoding and each of ``modes`` (default: :func:`decode_modes`) on the same held-out prompts."""
    torch.manual_seed(args.seed)
    check_draft_spec(args.draft)
    target, tokenizer = load_target(args.target)
    draft = load_draft(args.draft, target)
    prompts = held_out_prompts(tokenizer, args.data, args.prompts, args.max_prompt_tokens, args.seed)
    eos = tokenizer.eos_token_id
    modes = decode_modes(args) if modes is None else modes
    totals = {"plain": [0, 0.0, 0]} | {name: [0, 0.0, 0] for name in modes}  # tokens, seconds, forwards
    for i, prompt in enumerate(prompts):
        n, seconds = plain_decode(target, prompt, args.max_new_tokens, args.temperature, eos)
        totals["plain"][0] += n
        totals["plain"][1] += seconds
        totals["plain"][2] += n
        for name, spec in modes.items():
            gen = torch.Generator().manual_seed(args.seed + i)
            result = speculative_generate(
                target, draft, prompt, args.max_new_tokens, spec, args.temperature, eos, generator=gen
            )
            totals[name][0] += len(result.tokens)
            totals[name][1] += result.seconds
            totals[name][2] += result.target_forwards
        print(f"[eval] prompt {i + 1}/{len(prompts)} done", file=sys.stderr, flush=True)
    plain_rate = totals["plain"][0] / max(totals["plain"][1], 1e-9)
    rows = []
    for name, (tokens, seconds, forwards) in totals.items():
        rate = tokens / max(seconds, 1e-9)
        rows.append(
            {
                "mode": name,
                "max_nodes": modes[name].max_nodes if name in modes else None,
                "tokens": tokens,
                "target_forwards": forwards,
                "acceptance_length": tokens / max(forwards, 1),
                "tokens_per_s": rate,
                "speedup": rate / plain_rate,
            }
        )
    return {
        "draft": args.draft,
        "target": args.target or "SmolLM2-135M-Instruct (default)",
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "tree": {"depth": args.depth, "topk": args.topk, "max_nodes": args.max_nodes},
        "rows": rows,
    }


def markdown(report: dict) -> str:
    lines = [
        f"draft: {report['draft']}; target: {report['target']}; {report['prompts']} held-out prompts, "
        f"up to {report['max_new_tokens']} new tokens, temperature {report['temperature']}; tree {report['tree']}",
        "",
        "| mode | tokens | target forwards | acceptance length | tokens/s | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['mode']} | {r['tokens']} | {r['target_forwards']} | {r['acceptance_length']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m torchspec_ext.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", default="target", help="'target' (the target as its own draft) or an EAGLE-3 draft directory")
    parser.add_argument("--target", default=None, help="a Hugging Face causal-LM directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default=None, help="chat JSON/JSONL for the held-out prompts (default: ShareGPT)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--max-nodes", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("prompts", "max_new_tokens", "depth", "topk", "max_nodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = evaluate(args)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
