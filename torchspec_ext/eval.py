"""``python -m torchspec_ext.eval``: a draft's real acceptance length and speed-up, on the sets papers
and peers report (MT-Bench, HumanEval) and on held-out ShareGPT.

On each set's prompts (each turn of a multi-turn item asked after the target's own plain answer to
the turns before), the target decodes plainly (transformers' ``generate``: what a user would run
without us), with transformers' prompt-lookup decoding (a speculative peer that needs no
training), speculatively with the draft in each of its family's modes, with our prompt lookup and
suffix decoding alone, and with the draft, prompt lookup and suffix decoding verified together (one
tree a step: ``drafts.combined``), in the same run and dtype. The report gives, per set (and per
MT-Bench category) and mode: the acceptance length as SGLang counts it (tokens emitted per target
forward: ours) and as vLLM counts it (1 + accepted draft tokens per drafting step), tokens/s, the
speed-up over plain decoding, the acceptance rate at each draft position, and at temperature 0 how
many outputs equal plain decoding's and how many tokens agree before the first difference; for the
combination, what building its tree costs a step against the target's forward, and how well each
member's confidence is calibrated. docs/evaluation.md says how each is counted.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from torchspec_ext import drafts
from torchspec_ext.drafts.base import CONFIG_NAME, WEIGHTS_NAME, DraftFamily, DraftLoadError, chat_probe, read_config
from torchspec_ext.drafts.combined import (
    MIN_PROB,
    Combined,
    ModeSpec,
    build_proposer,
    evaluation_modes,
    fit_modes,
    output_caches,
)
from torchspec_ext.evalsets import PromptSetError, load_prompt_sets, turn_prompt
from torchspec_ext.evalstats import Decode
from torchspec_ext.options import DTYPES, at_least, option, parse
from torchspec_ext.speculate import Proposer, measure_node_cost, speculative_generate
from torchspec_ext.target import load_target, stop_token_ids

EVAL_DTYPES = ("float32", "bfloat16")


def _min_prob_check(v) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _sets_check(names) -> str | None:
    numbers = [n for n in names if n.isdigit() and not Path(n).is_file()]
    return f"takes prompt sets, not a count ({numbers[0]}): give the count with --limit" if numbers else None


@dataclass(frozen=True)
class EvalConfig:
    draft: str = option(
        "target",
        "a draft directory (train's output-dir/draft, a checkpoint, or export's output; any family), or a "
        "proposer that needs no training: 'lookup' (prompt lookup) or 'target' (the target as its own draft)",
    )
    target: str | None = option(None, "a Hugging Face causal-LM directory (default: SmolLM2-135M-Instruct)")
    prompts: list[str] = option(
        ["sharegpt"],
        "prompt sets: mt-bench (80 two-turn questions), humaneval (164 problems), sharegpt (held-out "
        "conversations, split as training splits them), or a JSON / JSONL FILE of prompts or chats",
        metavar="SET",
        check=_sets_check,
    )
    limit: int | None = option(16, "prompts per set (chosen with --seed, balanced over categories)", check=at_least(1))
    data: str | None = option(
        None, "chat JSON/JSONL whose held-out conversations are the sharegpt set (default: ShareGPT)"
    )
    max_new_tokens: int = option(64, "per turn", check=at_least(1))
    max_prompt_tokens: int = option(256, "prompts longer than this (first turns) are passed over", check=at_least(1))
    depth: int = option(4, "chain length and tree depth", check=at_least(1))
    topk: int = option(4, "children per tree node (1: no tree rows)", check=at_least(1))
    max_nodes: int = option(16, "draft nodes per tree", check=at_least(1))
    min_prob: float = option(
        MIN_PROB,
        "the pruned chain and tree propose no node below this cumulative draft probability (0: no pruned rows)",
        check=_min_prob_check,
    )
    lookup_tokens: int = option(
        10,
        "prompt_lookup_num_tokens of transformers' prompt-lookup row (its suggestion: 10), and the longest chain "
        "of our lookup row and of the combination's lookup",
        check=at_least(1),
    )
    node_cost: float | None = option(
        None,
        "the combination verifies a node only while it raises the expected tokens per cost, a node costing this "
        "much of a one-token target forward (default: measured here at the start)",
        check=at_least(0),
    )
    dtype: str = option(
        "auto",
        "of the target and the draft, for every mode; auto: whichever makes plain decoding fastest here "
        "(measured at the start)",
        choices=("auto", *EVAL_DTYPES),
    )
    temperature: float = option(0.0, check=at_least(0))
    seed: int = option(0)
    json: bool = option(False, "print the report as one JSON object instead of tables")
    plot: str | None = option(
        None, "write the acceptance rate at each draft position, per mode, to this PNG", metavar="PNG"
    )


def check_draft_spec(spec: str) -> None:
    """Fails fast (before the target loads) on a --draft that is no draft directory nor a proposer's name."""
    if spec in drafts.FAMILIES and not drafts.FAMILIES[spec].trainable:
        return
    path = Path(spec)
    if not ((path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()):
        untrained = ", ".join(repr(n) for n, f in drafts.FAMILIES.items() if not f.trainable)
        raise SystemExit(
            f"torchspec_ext.eval: cannot load draft {spec!r}: not a draft directory (expected {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}: python -m torchspec_ext.train's output-dir/draft, a checkpoint, or python -m "
            f"torchspec_ext.export's output), nor one of {untrained}"
        )


def load_draft(spec: str, target) -> tuple[DraftFamily, object]:
    """(family, draft) of ``spec``: a proposer that needs no training (its name) or a trained /
    exported draft directory of any family, in the target's device and dtype."""
    if spec in drafts.FAMILIES and not drafts.FAMILIES[spec].trainable:
        return drafts.FAMILIES[spec], drafts.FAMILIES[spec].untrained_draft(target)
    check_draft_spec(spec)
    try:
        family, draft = drafts.load_draft(Path(spec), target)
    except (DraftLoadError, OSError) as exc:
        raise SystemExit(f"torchspec_ext.eval: cannot load draft {spec!r}: {exc}") from None
    weight = next(target.parameters())
    return family, draft.to(weight.device, weight.dtype)


def recorded_training(spec: str) -> dict:
    """What a draft directory recorded of its training (config.json's "training"; {} if nothing)."""
    if spec in drafts.FAMILIES:
        return {}
    try:
        return read_config(Path(spec)).get("training") or {}
    except DraftLoadError as exc:
        raise SystemExit(f"torchspec_ext.eval: cannot load draft {spec!r}: {exc}") from None


def use_training_template(tokenizer, recorded: dict) -> str | None:
    """Renders prompts as the draft's training did: when the draft recorded a chat template whose
    probe chat renders differently in the target's tokenizer (another template, a thinking-mode
    switch), the recorded one replaces it. Returns a warning to show, or None."""
    if not recorded.get("chat_template") or recorded.get("chat_probe") == chat_probe(tokenizer):
        return None
    ours = chat_probe(tokenizer)
    tokenizer.chat_template = recorded["chat_template"]
    return (
        "the target's chat template renders chats differently from the one this draft was trained with "
        f"(its probe chat ends {ours[-60:]!r} here, {recorded['chat_probe'][-60:]!r} in training): prompts are "
        "rendered with the training template, as a server must render them for the draft to accept"
    )


@dataclass
class Decoded:
    tokens: list[int]
    seconds: float
    forwards: int  # target forwards that emitted tokens
    accepted_per_step: list[int] | None = None  # speculative modes
    proposed_per_step: list[int] | None = field(default=None)


class ForwardCounter:
    """Counts the calls of a module's forward (the target's passes, whoever makes them) and their seconds."""

    def __init__(self, module):
        self.calls, self.seconds, self._began = 0, 0.0, 0.0
        module.register_forward_pre_hook(self._count)
        module.register_forward_hook(self._time)

    def _count(self, module, args):
        self.calls += 1
        self._began = time.perf_counter()

    def _time(self, module, args, output):
        self.seconds += time.perf_counter() - self._began


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


class SpeculativeDecoder:
    """Speculative decoding with ``proposer`` (prompt ``i`` sampled with seed ``seed + i``). Each output
    is added to the suffix caches the proposer reads (one cache per mode and run, as one per server);
    with a ``counter``, the target's forward seconds and passes in these decodes are summed."""

    def __init__(self, target, proposer: Proposer, temperature: float, eos, seed: int, counter=None):
        self.target, self.proposer, self.temperature, self.eos, self.seed = target, proposer, temperature, eos, seed
        self.counter, self.forward_seconds, self.forwards = counter, 0.0, 0

    def __call__(self, prompt, new_tokens, i) -> Decoded:
        gen = torch.Generator().manual_seed(self.seed + i)
        before = (self.counter.seconds, self.counter.calls) if self.counter else (0.0, 0)
        r = speculative_generate(
            self.target, self.proposer, prompt, new_tokens, self.temperature, self.eos, generator=gen
        )
        if self.counter:
            self.forward_seconds += self.counter.seconds - before[0]
            self.forwards += self.counter.calls - before[1]
        for cache in output_caches(self.proposer):
            cache.add(r.tokens)
        return Decoded(r.tokens, r.seconds, r.target_forwards, r.accepted_per_step, r.proposed_per_step)

    def restart(self) -> None:
        """Forget what the warm-up left: cached outputs, calibration, statistics."""
        for cache in output_caches(self.proposer):
            cache.clear()
        if isinstance(self.proposer, Combined):
            self.proposer.clear_statistics()
        self.forward_seconds, self.forwards = 0.0, 0

    def combination_report(self) -> dict | None:
        """The combination's costs and calibration (None for another proposer)."""
        if not isinstance(self.proposer, Combined):
            return None
        report = self.proposer.stats.report()
        report["forward_ms_per_step"] = 1000 * self.forward_seconds / max(1, self.forwards) if self.counter else None
        return report


def speculative_decoder(target, proposer: Proposer, temperature: float, eos, seed: int, counter=None) -> Decoder:
    return SpeculativeDecoder(target, proposer, temperature, eos, seed, counter)


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    """Tokens two outputs share before they first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def decode_sets(decoders: dict[str, Decoder], sets, tokenizer, new_tokens: int, log=None) -> list[Decode]:
    """The evaluation loop: every decoder on every turn of every item of every set. A later turn is
    asked after plain decoding's answers to the turns before (the target's own answers), the same
    prompt for every mode; each mode's output is compared with plain decoding's ("plain" must be the
    first decoder)."""
    records, number = [], 0
    for prompt_set in sets:
        for item in prompt_set.items:
            answers = []
            for turn in range(len(item.turns)):
                prompt = turn_prompt(tokenizer, item, answers)
                plain = None
                for mode, decode in decoders.items():
                    out = decode(prompt, new_tokens, number)
                    plain = out if plain is None else plain
                    records.append(
                        Decode(
                            prompt_set.name, item.category, item.id, turn, mode, len(out.tokens), out.seconds,
                            out.forwards, out.accepted_per_step, out.proposed_per_step,
                            out.tokens == plain.tokens, agreeing_prefix(out.tokens, plain.tokens),
                        )
                    )  # fmt: skip
                answers.append(plain.tokens)
                number += 1
            if log is not None:
                log(prompt_set.name, item.id)
    return records


@dataclass
class ModeAcceptance:
    """A mode's greedy decodes of some prompts: tokens per target forward, and tokens/s measured."""

    acceptance_length: float
    tokens_per_s: float


def measure_modes(
    target, family: DraftFamily, draft, prompts, new_tokens: int, modes: dict[str, ModeSpec], eos
) -> dict[str, ModeAcceptance]:
    """Greedy decodes of ``prompts`` (token ids) in each mode (the draft is left in the train/eval mode
    it was in; a mode's suffix cache holds its earlier outputs)."""
    was_training = draft.training
    draft.eval()
    found = {}
    for name, spec in modes.items():
        decode = speculative_decoder(target, build_proposer(family, draft, spec), 0.0, eos, 0)
        outs = [decode(prompt, new_tokens, i) for i, prompt in enumerate(prompts)]
        tokens, forwards = sum(len(o.tokens) for o in outs), max(1, sum(o.forwards for o in outs))
        found[name] = ModeAcceptance(tokens / forwards, tokens / max(1e-9, sum(o.seconds for o in outs)))
    draft.train(was_training)
    return found


def acceptance_lengths(
    target, family: DraftFamily, draft, prompts, new_tokens: int, modes: dict[str, ModeSpec], eos
) -> dict[str, float]:
    """Greedy acceptance length of a draft in training on ``prompts`` (token ids), per mode."""
    found = measure_modes(target, family, draft, prompts, new_tokens, modes, eos)
    return {name: m.acceptance_length for name, m in found.items()}


def plain_tokens_per_s(model, prompts, new_tokens: int, eos, repeats: int = 1, **options) -> float:
    """Tokens/s of plain greedy decoding of ``prompts`` (token ids), ``new_tokens`` each, the best of
    ``repeats`` passes, after a short warm-up decode (which also makes ``small_rows`` measure its ways
    outside the timing); ``options`` go to ``generate`` (``min_new_tokens`` to time exactly that many)."""
    if not prompts:
        return 0.0
    eos = eos or None  # generate takes no empty list: then the model's own end tokens
    generate_decode(model, prompts[0], 4, 0.0, eos)
    best = 0.0
    for _ in range(repeats):
        outs = [generate_decode(model, prompt, new_tokens, 0.0, eos, **options) for prompt in prompts]
        best = max(best, sum(len(o.tokens) for o in outs) / max(1e-9, sum(o.seconds for o in outs)))
    return best


def plain_seconds_per_token(model, prompt, tokens: int = 16, repeats: int = 2) -> float:
    """Best time per token of plain greedy decoding of exactly ``tokens`` tokens after ``prompt``."""
    return 1 / plain_tokens_per_s(model, [prompt], tokens, None, repeats, min_new_tokens=tokens)


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


def evaluate(args: EvalConfig, modes: dict[str, ModeSpec] | None = None) -> dict:
    """Plain decoding, prompt lookup and each of ``modes`` (default: the draft family's, then our
    lookup, suffix decoding and the combination: ``drafts.combined.evaluation_modes``) on the same
    prompts of each set; the report (:func:`torchspec_ext.evalreport.build_report`)."""
    from torchspec_ext.evalreport import build_report

    torch.manual_seed(args.seed)
    check_draft_spec(args.draft)
    try:
        target, tokenizer = load_target(args.target)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"torchspec_ext.eval: cannot load the target: {exc}") from None
    warning = use_training_template(tokenizer, recorded_training(args.draft))
    if warning:
        print(f"[eval] warning: {warning}", file=sys.stderr)
    try:
        sets = load_prompt_sets(
            args.prompts, tokenizer, limit=args.limit, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed,
            data_path=args.data,
        )  # fmt: skip
    except PromptSetError as exc:
        raise SystemExit(f"torchspec_ext.eval: {exc}") from None
    first = turn_prompt(tokenizer, sets[0].items[0])
    target, dtype = choose_dtype(target, args.dtype, first)
    family, draft = load_draft(args.draft, target)
    node_cost = args.node_cost
    if node_cost is None:
        node_cost = measure_node_cost(target, first)
        print(f"[eval] a verified node costs {node_cost:.3f} of a one-node target forward here", file=sys.stderr)
    counter = ForwardCounter(target)
    eos = stop_token_ids(target, tokenizer)
    if modes is None:
        modes = evaluation_modes(
            family, args.depth, args.topk, args.max_nodes, args.min_prob, args.lookup_tokens, node_cost
        )
    modes = fit_modes(family, draft, modes)
    decoders: dict[str, Decoder] = {
        "plain": lambda p, n, i: generate_decode(target, p, n, args.temperature, eos, counter),
        "prompt lookup": lambda p, n, i: generate_decode(
            target, p, n, args.temperature, eos, counter, prompt_lookup_num_tokens=args.lookup_tokens
        ),
    }
    for name, spec in modes.items():
        proposer = build_proposer(family, draft, spec)
        decoders[name] = speculative_decoder(target, proposer, args.temperature, eos, args.seed, counter)
    for decode in decoders.values():  # warm-up: first calls pay one-time costs
        decode(first, 8, 0)
        if isinstance(decode, SpeculativeDecoder):
            decode.restart()
    count = sum(len(s.items) for s in sets)
    done = iter(range(1, count + 1))
    log = lambda name, item: print(f"[eval] {next(done)}/{count} ({name} {item}) done", file=sys.stderr, flush=True)
    records = decode_sets(decoders, sets, tokenizer, args.max_new_tokens, log)
    header = {
        "draft": args.draft,
        "family": family.title,
        "target": args.target or "SmolLM2-135M-Instruct (default)",
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "sets": {
            s.name: {"source": s.source, "items": len(s.items), "of": s.total, "too_long": s.too_long} for s in sets
        },
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "modes": {
            name: {**asdict(spec), "depth": spec.depth, "max_nodes": spec.max_nodes} for name, spec in modes.items()
        },
        "lookup_tokens": args.lookup_tokens,
        "node_cost": node_cost,
        "template_warning": warning,
        "combination": {
            name: d.combination_report()
            for name, d in decoders.items()
            if isinstance(d, SpeculativeDecoder) and d.combination_report() is not None
        },
    }
    return build_report(header, records, {name: spec.depth for name, spec in modes.items()})


def parse_args(argv=None) -> EvalConfig:
    return parse(EvalConfig, argv, "python -m torchspec_ext.eval", __doc__.split("\n\n")[0])


def main(argv=None) -> int:
    from torchspec_ext.evalreport import markdown, write_plot

    args = parse_args(argv)
    report = evaluate(args)
    if args.plot:
        write_plot(report, Path(args.plot))
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
