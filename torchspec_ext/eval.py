"""``python -m torchspec_ext.eval``: a draft's real acceptance length and speed-up.

On held-out prompts, the target decodes plainly (transformers' ``generate``: what a user would
run without us), with transformers' prompt-lookup decoding (a speculative peer that needs no
training), and speculatively with the draft, as a chain and as a dynamic tree, in the same run
and dtype; the table gives the acceptance length (tokens emitted per target forward), tokens/s,
the speed-up over plain decoding, and at temperature 0 whether each mode's output is the plain
decoding's, token for token.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from torchspec_ext import drafts
from torchspec_ext.data import HELD_OUT_FRACTION, load_conversations, short_prompts, split_held_out
from torchspec_ext.drafts.base import CONFIG_NAME, WEIGHTS_NAME, DraftFamily, DraftLoadError
from torchspec_ext.options import DTYPES, at_least, option, parse
from torchspec_ext.speculate import Proposer, TargetAsDraft, TreeProposer, TreeSpec, speculative_generate
from torchspec_ext.target import load_target, stop_token_ids

EVAL_DTYPES = ("float32", "bfloat16")


def _min_prob_check(v) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


@dataclass(frozen=True)
class EvalConfig:
    draft: str = option(
        "target",
        "a draft directory (train's output-dir/draft, a checkpoint, or export's output; any family), 'target' "
        "(the target as its own draft) or 'lookup' (prompt lookup, no training)",
    )
    target: str | None = option(None, "a Hugging Face causal-LM directory (default: SmolLM2-135M-Instruct)")
    data: str | None = option(None, "chat JSON/JSONL for the held-out prompts (default: ShareGPT)")
    prompts: int = option(16, check=at_least(1))
    max_new_tokens: int = option(64, check=at_least(1))
    max_prompt_tokens: int = option(256, check=at_least(1))
    depth: int = option(4, "chain length and tree depth", check=at_least(1))
    topk: int = option(4, "children per tree node (1: no tree rows)", check=at_least(1))
    max_nodes: int = option(16, "draft nodes per tree", check=at_least(1))
    min_prob: float = option(
        0.15,
        "the pruned chain and tree propose no node below this cumulative draft probability (0: no pruned rows)",
        check=_min_prob_check,
    )
    lookup_tokens: int = option(
        10,
        "prompt_lookup_num_tokens of the prompt-lookup row (transformers' suggestion: 10)",
        check=at_least(1),
    )
    dtype: str = option(
        "auto",
        "of the target and the draft, for every mode; auto: whichever makes plain decoding fastest here "
        "(measured at the start)",
        choices=("auto", *EVAL_DTYPES),
    )
    temperature: float = option(0.0, check=at_least(0))
    seed: int = option(0)
    json: bool = option(False, "print JSON instead of a table")


def held_out_prompts(tokenizer, data_path, count: int, max_prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """The first user turn of held-out conversations (held out as training holds them out by
    default), in the target's chat template."""
    conversations, _ = load_conversations(data_path)
    _, held_out = split_held_out(conversations, HELD_OUT_FRACTION, seed=seed)
    return short_prompts(held_out, tokenizer, count, max_prompt_tokens)


def check_draft_spec(spec: str) -> None:
    """Fails fast (before the target loads) on a --draft that is no draft directory nor a proposer's name."""
    if spec == "target" or (spec in drafts.FAMILIES and not drafts.FAMILIES[spec].trainable):
        return
    path = Path(spec)
    if not ((path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()):
        untrained = ", ".join(repr(n) for n, f in drafts.FAMILIES.items() if not f.trainable)
        raise SystemExit(
            f"torchspec_ext.eval: cannot load draft {spec!r}: not a draft directory (expected {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}: python -m torchspec_ext.train's output-dir/draft, a checkpoint, or python -m "
            f"torchspec_ext.export's output), nor 'target', nor {untrained}"
        )


class TargetFamily(DraftFamily):
    """The target as its own draft (a ceiling on acceptance; the tests use it)."""

    name, title, trainable = "target", "the target itself", False

    def proposer(self, draft, spec: TreeSpec) -> Proposer:
        return TreeProposer(draft, spec)


def load_draft(spec: str, target) -> tuple[DraftFamily, object]:
    """(family, draft) of ``spec``: 'target' (the target as its own draft), a proposer that needs no
    training ('lookup'), or a trained / exported draft directory of any family, in the target's
    device and dtype."""
    if spec == "target":
        return TargetFamily(), TargetAsDraft(target)
    if spec in drafts.FAMILIES and not drafts.FAMILIES[spec].trainable:
        return drafts.FAMILIES[spec], None
    check_draft_spec(spec)
    try:
        family, draft = drafts.load_draft(Path(spec), target)
    except (DraftLoadError, OSError) as exc:
        raise SystemExit(f"torchspec_ext.eval: cannot load draft {spec!r}: {exc}") from None
    weight = next(target.parameters())
    return family, draft.to(weight.device, weight.dtype)


@dataclass
class Decoded:
    tokens: list[int]
    seconds: float
    forwards: int  # target forwards that emitted tokens


class ForwardCounter:
    """Counts the calls of a module's forward (the target's passes, whoever makes them)."""

    def __init__(self, module):
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


@torch.no_grad()
def generate_decode(model, prompt, max_new_tokens, temperature, eos, counter=None, **options) -> Decoded:
    """transformers' ``generate`` (plain decoding, or with ``options`` such as prompt lookup)."""
    kwargs = {"do_sample": temperature > 0, **options}
    if temperature > 0:
        kwargs["temperature"] = temperature
    before = counter.calls if counter else 0
    start = time.perf_counter()
    pad = (eos[0] if eos else None) if isinstance(eos, (list, tuple)) else eos  # generate pads with one id
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **kwargs
    )
    seconds = time.perf_counter() - start
    return Decoded(out[0, len(prompt) :].tolist(), seconds, counter.calls - before if counter else 0)


Decoder = Callable[[list[int], int, int], Decoded]  # (prompt, new tokens, the prompt's number) -> output


def speculative_decoder(target, proposer: Proposer, temperature: float, eos, seed: int) -> Decoder:
    """Speculative decoding with ``proposer`` (prompt ``i`` sampled with seed ``seed + i``)."""

    def decode(prompt, new_tokens, i):
        gen = torch.Generator().manual_seed(seed + i)
        r = speculative_generate(target, proposer, prompt, new_tokens, temperature, eos, generator=gen)
        return Decoded(r.tokens, r.seconds, r.target_forwards)

    return decode


def decode_prompts(decoders: dict[str, Decoder], prompts, new_tokens: int, log=None) -> dict[str, dict]:
    """The evaluation loop: every decoder on every prompt. Totals per decoder: tokens, seconds,
    target forwards, and how many outputs equal the one of the decoder named "plain" (if any)."""
    totals = {name: {"tokens": 0, "seconds": 0.0, "forwards": 0, "same": 0} for name in decoders}
    for i, prompt in enumerate(prompts):
        plain = None
        for name, decode in decoders.items():
            out = decode(prompt, new_tokens, i)
            if name == "plain":
                plain = out.tokens
            t = totals[name]
            t["tokens"] += len(out.tokens)
            t["seconds"] += out.seconds
            t["forwards"] += out.forwards
            t["same"] += out.tokens == plain
        if log is not None:
            log(i)
    return totals


def acceptance_length(totals: dict) -> float:
    """Tokens emitted per target forward."""
    return totals["tokens"] / max(totals["forwards"], 1)


def acceptance_lengths(
    target, family: DraftFamily, draft, prompts, new_tokens: int, modes: dict[str, TreeSpec], eos
) -> dict[str, float]:
    """Greedy acceptance length of a draft in training, per mode (the draft is left in the
    train/eval mode it was in)."""
    was_training = draft.training
    draft.eval()
    decoders = {
        name: speculative_decoder(target, family.proposer(draft, spec), 0.0, eos, 0) for name, spec in modes.items()
    }
    totals = decode_prompts(decoders, prompts, new_tokens)
    draft.train(was_training)
    return {name: acceptance_length(t) for name, t in totals.items()}


def plain_seconds_per_token(model, prompt, tokens: int = 16, repeats: int = 2) -> float:
    """Best time per token of plain greedy decoding of ``tokens`` tokens (after one warm-up call)."""
    generate_decode(model, prompt, 4, 0.0, None)
    runs = (generate_decode(model, prompt, tokens, 0.0, None, min_new_tokens=tokens).seconds for _ in range(repeats))
    return min(runs) / tokens


def choose_dtype(target, name: str, prompt) -> tuple:
    """(target in the dtype, its name): ``name``, or for 'auto' the one of float32 and bfloat16 in
    which plain decoding is fastest on this machine (measured on ``prompt``)."""
    names = list(EVAL_DTYPES) if name == "auto" else [name]
    models = [copy.deepcopy(target) for _ in names[1:]] + [target]  # the last one converted in place
    candidates = {n: model.to(DTYPES[n]) for n, model in zip(names, models)}
    timed = {}
    for dtype, model in candidates.items():
        try:
            timed[dtype] = plain_seconds_per_token(model, prompt)
        except RuntimeError as exc:  # a dtype this machine cannot run
            print(f"[eval] the target does not run in {dtype} here: {exc}", file=sys.stderr)
    if not timed:
        raise SystemExit(
            f"torchspec_ext.eval: --dtype {name}: the target does not run in "
            f"{' or '.join(names)} on this machine; try --dtype float32"
        )
    if name != "auto":
        return candidates[name], name
    best = min(timed, key=timed.get)
    shown = ", ".join(f"{k} {1 / v:.1f} tokens/s" for k, v in timed.items())
    print(f"[eval] --dtype auto: plain decoding {shown}: {best}", file=sys.stderr)
    return candidates[best], best


def evaluate(args: EvalConfig, modes: dict[str, TreeSpec] | None = None) -> dict:
    """Plain decoding, prompt lookup and each of ``modes`` (default: the draft family's) on the same
    held-out prompts."""
    torch.manual_seed(args.seed)
    check_draft_spec(args.draft)
    try:
        target, tokenizer = load_target(args.target)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"torchspec_ext.eval: cannot load the target: {exc}") from None
    prompts = held_out_prompts(tokenizer, args.data, args.prompts, args.max_prompt_tokens, args.seed)
    target, dtype = choose_dtype(target, args.dtype, prompts[0])
    counter = ForwardCounter(target)
    family, draft = load_draft(args.draft, target)
    eos = stop_token_ids(target, tokenizer)
    if modes is None:
        modes = family.decode_modes(args.depth, args.topk, args.max_nodes, args.min_prob)
    decoders: dict[str, Decoder] = {
        "plain": lambda p, n, i: generate_decode(target, p, n, args.temperature, eos, counter),
        "prompt lookup": lambda p, n, i: generate_decode(
            target, p, n, args.temperature, eos, counter, prompt_lookup_num_tokens=args.lookup_tokens
        ),
    }
    for name, spec in modes.items():
        decoders[name] = speculative_decoder(target, family.proposer(draft, spec), args.temperature, eos, args.seed)
    for decode in decoders.values():  # warm-up: first calls pay one-time costs
        decode(prompts[0], 8, 0)
    log = lambda i: print(f"[eval] prompt {i + 1}/{len(prompts)} done", file=sys.stderr, flush=True)
    totals = decode_prompts(decoders, prompts, args.max_new_tokens, log)
    plain_rate = totals["plain"]["tokens"] / max(totals["plain"]["seconds"], 1e-9)
    rows = []
    for name, t in totals.items():
        rate = t["tokens"] / max(t["seconds"], 1e-9)
        rows.append(
            {
                "mode": name,
                "max_nodes": modes[name].max_nodes if name in modes else None,
                "tokens": t["tokens"],
                "target_forwards": t["forwards"],
                "acceptance_length": acceptance_length(t),
                "tokens_per_s": rate,
                "speedup": rate / plain_rate,
                "same_as_plain": t["same"],
            }
        )
    return {
        "draft": args.draft,
        "target": args.target or "SmolLM2-135M-Instruct (default)",
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "tree": {"depth": args.depth, "topk": args.topk, "max_nodes": args.max_nodes},
        "min_prob": args.min_prob,
        "lookup_tokens": args.lookup_tokens,
        "rows": rows,
    }


def markdown(report: dict) -> str:
    same = "outputs equal to plain (prompts)" if report["temperature"] == 0 else "same as plain (prompts; sampling)"
    lines = [
        f"draft: {report['draft']}; target: {report['target']} in {report['dtype']}, {report['threads']} threads; "
        f"{report['prompts']} held-out prompts, up to {report['max_new_tokens']} new tokens, temperature "
        f"{report['temperature']}; tree {report['tree']}; pruned below draft probability {report['min_prob']:g}; "
        f"prompt lookup {report['lookup_tokens']} tokens",
        "",
        f"| mode | tokens | target forwards | acceptance length | tokens/s | speed-up | {same} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['mode']} | {r['tokens']} | {r['target_forwards']} | {r['acceptance_length']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['same_as_plain']}/{report['prompts']} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> EvalConfig:
    return parse(EvalConfig, argv, "python -m torchspec_ext.eval", __doc__.split("\n\n")[0])


def main(argv=None) -> int:
    args = parse_args(argv)
    report = evaluate(args)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
