"""Draft families and options compared at equal CPU seconds, for a shared machine, where a wall-clock
budget (train's --time-budget) measures the neighbours' load more than the variant.

``make-pool`` runs the target once over the default run's first teacher batches and keeps them, each
with the CPU seconds the teacher took. ``run`` trains one variant on that pool: it is charged those
seconds for each teacher batch it uses plus the CPU seconds (``time.process_time``) of its own steps,
replays each batch ``--epochs`` times as train does on a CPU (the first pass in order, then shuffled),
on train's warm-up + cosine schedule sized from its first steps' cost, until ``--cpu-seconds`` are
spent. It prints the greedy acceptance length (no load changes it) on the first turns of eval's sets
(``--eval-sets``: mt-bench, humaneval, sharegpt, the held-out split; sharegpt by default), and, with ``--save``,
writes the draft with its training metadata for ``python -m torchspec_ext.eval --draft``.

    python scripts/cpu_budget_ab.py make-pool --pool /tmp/pool.pt --batches 80
    python scripts/cpu_budget_ab.py run --pool /tmp/pool.pt --cpu-seconds 840 --save /tmp/ab/dflash \\
        -- --draft-family dflash --lr 1e-3
    python -m torchspec_ext.eval --draft /tmp/ab/dflash --prompts mt-bench humaneval sharegpt
    python scripts/cpu_budget_ab.py cost /tmp/ab/eagle3 /tmp/ab/dflash

``cost`` charges a saved draft's proposer its CPU seconds while it decodes (every call of it: the
draft's whole work) and reports them per decoding step and per proposed token, per mode, beside the
whole step's.

The arguments after ``--`` are train's: the family and its options, --lr, --loss, --warmup-steps,
--epochs, --seed (make-pool's: --target, --data, --batch-size, --max-length, --topk; a run's batches
keep the shapes the pool was made with).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from torchspec_ext import atomic, drafts, ops
from torchspec_ext.drafts.base import training_metadata
from torchspec_ext.eval import acceptance_lengths
from torchspec_ext.evalsets import load_prompt_set, turn_prompt
from torchspec_ext.target import stop_token_ids
from torchspec_ext.teacher import Teacher, TeacherBatch
from torchspec_ext.training.batches import Batches
from torchspec_ext.training.config import parse_args
from torchspec_ext.training.losses import loss_function
from torchspec_ext.training.run import load_target_and_data, new_draft
from torchspec_ext.training.trainer import DraftTrainer

# Every feature layer the default 30-layer target's drafts read: EAGLE-3's [2, 15, 27], DFlash's and
# DSpark's of 1, 2, 3 and 5 draft layers ([16], [2, 28], [2, 15, 28], [2, 9, 15, 21, 28]).
POOL_LAYERS = [2, 9, 15, 16, 21, 27, 28]


def setup(train_argv: list[str]):
    """(train's config, target, tokenizer, train conversations, held-out conversations)."""
    config = parse_args(["--device", "cpu", "--max-steps", "1", "--target-dtype", "float32", *train_argv])
    target, tokenizer, train, held_out = load_target_and_data(config, "cpu")
    return config, target, tokenizer, train, held_out


def make_pool(count: int, path: Path, train_argv: list[str]) -> None:
    """The first ``count`` teacher batches; a pool already at ``path`` made with the same shapes is
    extended (its batches are the same first ones: the batch order is train's, fixed by the seed)."""
    config, target, tokenizer, train, _ = setup(train_argv)
    shapes = dict(batch_size=config.batch_size, max_length=config.max_length, topk=config.topk, seed=config.seed)
    if path.exists():
        old = torch.load(path, mmap=True)
        if {"seed": config.seed, **old.get("shapes", {})} != shapes or old["layers"] != POOL_LAYERS:
            raise SystemExit(f"{path} holds batches of {old.get('shapes')}, layers {old['layers']}; these would be "
                             f"{shapes}, layers {POOL_LAYERS}: give another --pool")  # fmt: skip
        made, cpu = old["batches"], old["teacher_cpu_s"]
        print(f"[pool] {path} holds {len(made)} batches; making {max(0, count - len(made))} more", file=sys.stderr)
    else:
        made, cpu = [], []
    batches = Batches(train, tokenizer, config.batch_size, config.max_length, config.seed)
    teacher = Teacher(target, POOL_LAYERS, torch.arange(target.config.vocab_size), config.topk)
    for i in range(len(made), count):
        _, ids, mask = batches.tokens(i)
        begin = time.process_time()
        made.append(teacher(ids, mask, i).tensors())
        cpu.append(time.process_time() - begin)
        print(f"[pool] batch {i + 1}/{count}: {cpu[-1]:.1f} CPU s", file=sys.stderr, flush=True)
    with atomic.staged(path) as tmp:  # written beside, then renamed: the extended pool is still mapped from path
        torch.save({"layers": POOL_LAYERS, "batches": made, "teacher_cpu_s": cpu, "shapes": shapes}, tmp)


def pool_batch(pool: dict, j: int, columns: list[int], target_to_draft: torch.Tensor, hidden: int) -> TeacherBatch:
    """Pool batch ``j`` as a draft reads it: its feature layers (``columns`` of the pool's) and its vocabulary."""
    t = dict(pool["batches"][j])
    f = t["features"]
    t["features"] = f.view(*f.shape[:2], -1, hidden)[:, :, columns].flatten(2)
    ti = t["teacher_indices"]
    t["teacher_indices"] = torch.where(ti >= 0, target_to_draft[ti.clamp(min=0)], -1)
    return TeacherBatch.from_tensors(t, f"pool batch {j}")


def replay_order(first: int, count: int, epochs: int, seed: int) -> list[int]:
    """Batches ``0 .. count - 1`` in order, then ``epochs - 1`` shuffled passes over them."""
    gen = torch.Generator().manual_seed(seed)
    order = list(range(min(first, count), count))
    return order + [j for _ in range(epochs - 1) for j in torch.randperm(count, generator=gen).tolist()]


def planned_steps(done: int, made: int, left: float, step_cpu: float, teacher_cpu: list[float], epochs: int) -> int:
    """The most steps (at least ``done + 1``) whose remaining charges fit in ``left`` CPU seconds:
    ``step_cpu`` for each step after ``done``, and the teacher's for each batch after the ``made``
    first that the schedule reads (``epochs`` passes over ``ceil(steps / epochs)`` batches; one past
    the pool's end charged the pool's mean: the caller says when the pool is too small)."""
    mean, step_cpu = sum(teacher_cpu) / len(teacher_cpu), max(step_cpu, 1e-3)  # a step is never free
    total = done + 1
    while True:
        batches = math.ceil((total + 1) / epochs)
        teacher = sum(teacher_cpu[made:batches]) + max(0, batches - max(made, len(teacher_cpu))) * mean
        if (total + 1 - done) * step_cpu + teacher > left:
            return total
        total += 1


def train_within(
    trainer, batch_of, teacher_cpu: list[float], cpu_seconds: float, epochs: int, seed: int, steps: int | None = None
) -> dict:
    """Steps of ``trainer`` on ``batch_of(j)`` until ``cpu_seconds`` are charged; the schedule's length
    is planned after two steps from their cost, and again after twelve from the cost of steps 2-11
    (the first steps cost more than the rest), inside the warm-up. With ``steps``, exactly that many
    (the same batches in the same order for every variant of a seed)."""
    spent, made, step_cpu, losses = 0.0, 0, [], []
    order = [0, 1]
    while True:
        done = len(step_cpu)
        if done in (2, 12):  # a new plan keeps the order of the steps already taken (the first pass is in order)
            measured = step_cpu[2:] if done > 2 else step_cpu
            total = steps or planned_steps(done, made, cpu_seconds - spent, sum(measured) / len(measured),
                                           teacher_cpu, epochs)  # fmt: skip
            count = min(len(teacher_cpu), math.ceil(total / epochs))
            order = [0, 1] + replay_order(2, count, epochs, seed)
            trainer.total_steps = min(total, len(order))
            if len(order) < total:
                print(f"[ab] the pool's {count} batches allow {len(order)} of the {total} steps the budget would",
                      file=sys.stderr)  # fmt: skip
        out_of_budget = steps is None and spent >= cpu_seconds
        if done >= len(order) or (done >= 2 and (done >= trainer.total_steps or out_of_budget)):
            break
        j = order[done]
        if j >= made:  # a teacher batch's first use: the target's forward is charged
            spent += sum(teacher_cpu[made : j + 1])
            made = j + 1
        begin = time.process_time()
        result = trainer.step(batch_of(j))
        step_cpu.append(time.process_time() - begin)
        spent += step_cpu[-1]
        losses.append(result.loss)
        if len(step_cpu) % 10 == 0:
            print(
                f"[ab] step {len(step_cpu)}/{trainer.total_steps}: {spent:.0f} CPU s, loss {result.loss:.3f}, "
                f"accuracy {result.step_accuracies[0]:.2f}",
                file=sys.stderr,
                flush=True,
            )
    return {
        "spent_cpu_s": round(spent, 1),
        "steps": len(step_cpu),
        "teacher_batches": made,
        "step_cpu_s": round(sum(step_cpu) / len(step_cpu), 2),
        "last_losses": [round(x, 3) for x in losses[-5:]],
    }


def eval_prompts(sets: list[str], count: int, tokenizer, seed: int) -> dict[str, list[list[int]]]:
    """The first turns of ``count`` prompts of each of eval's sets, chosen as eval chooses them, as
    token ids (``sharegpt``: the held-out conversations, the prompts of train's own check)."""
    chosen = {name: load_prompt_set(name, tokenizer, limit=count, max_prompt_tokens=256, seed=seed) for name in sets}
    return {name: [turn_prompt(tokenizer, item) for item in found.items] for name, found in chosen.items()}


def run(args, train_argv: list[str]) -> dict:
    pool = torch.load(args.pool, mmap=True)  # mapped: runs side by side share one copy of the pool
    config, target, tokenizer, train, _ = setup(train_argv)
    torch.manual_seed(config.seed)
    family = drafts.family(config.draft_family)
    draft = new_draft(family, target, Batches(train, tokenizer, 1, config.max_length, config.seed), config)
    missing = [i for i in draft.feature_layers if i not in pool["layers"]]
    if missing:
        raise SystemExit(f"the draft reads target layers {missing}; the pool holds {pool['layers']}")
    columns = [pool["layers"].index(i) for i in draft.feature_layers]
    t2d, hidden = draft.target_to_draft(), target.config.hidden_size
    trainer = DraftTrainer(
        draft, config.family_options, loss=loss_function(config.loss, ops), lr=config.lr,
        warmup_steps=config.warmup_steps, total_steps=10**6, weight_decay=config.weight_decay,
        grad_clip=config.grad_clip,
    )  # fmt: skip
    batch_of = lambda j: pool_batch(pool, j, columns, t2d, hidden)
    trained = train_within(
        trainer, batch_of, pool["teacher_cpu_s"], args.cpu_seconds, config.epochs, config.seed, args.steps
    )
    if args.save:
        draft.metadata = training_metadata(tokenizer, config.target, "float32", config.loss, config.responses)
        draft.save(args.save)
        atomic.make_readable(args.save)  # as train's draft folder: readable by the engines' users
    modes = family.fit_modes(draft, family.decode_modes(4, 4, 16, 0.0))
    eos = stop_token_ids(target, tokenizer)
    begin = time.process_time()
    accepted = {}
    for name, prompts in eval_prompts(args.eval_sets, args.eval_prompts, tokenizer, config.seed).items():
        lengths = acceptance_lengths(target, family, draft, prompts, args.eval_new_tokens, modes, eos)
        accepted[name] = {mode: round(v, 3) for mode, v in lengths.items()}
    return {
        "family": config.draft_family,
        "options": dataclasses.asdict(config.family_options),
        "train_args": train_argv,
        "lr": config.lr,
        "loss": config.loss,
        "cpu_seconds": None if args.steps else args.cpu_seconds,
        "pool_shapes": pool.get("shapes"),
        **trained,
        "acceptance_length": accepted,
        "eval_sets": {"sets": args.eval_sets, "prompts": args.eval_prompts, "new_tokens": args.eval_new_tokens},
        "eval_cpu_s": round(time.process_time() - begin, 1),
        "saved": str(args.save) if args.save else None,
    }


class TimedProposer:
    """A proposer whose calls (``reset``, ``observe``, ``propose``: all the draft's work) are charged
    their CPU seconds, and whose proposals' nodes are counted."""

    def __init__(self, proposer):
        self.inner, self.feature_layers = proposer, proposer.feature_layers
        self.cpu_s, self.proposals, self.nodes = 0.0, 0, 0

    def _charged(self, call, *args):
        begin = time.process_time()
        result = call(*args)
        self.cpu_s += time.process_time() - begin
        return result

    def reset(self, features):
        self._charged(self.inner.reset, features)

    def observe(self, features):
        self._charged(self.inner.observe, features)

    def propose(self, context):
        tokens, parents = self._charged(self.inner.propose, context)
        self.proposals += 1
        self.nodes += len(tokens) - 1  # node 0 is the committed root
        return tokens, parents


def draft_cost(args) -> list[dict]:
    """Per saved draft and decode mode: the draft's CPU per decoding step and per proposed token,
    beside the whole step's (the target's verification included), greedy on held-out prompts; and the
    speed-up over plain decoding (transformers' generate) that these CPU seconds give."""
    from torchspec_ext.eval import generate_decode, load_draft
    from torchspec_ext.serve.server import warm_up
    from torchspec_ext.speculate import speculative_generate

    config, target, tokenizer, _, _ = setup([])
    prompts = eval_prompts(["sharegpt"], args.prompts, tokenizer, config.seed)["sharegpt"]
    eos, rows = stop_token_ids(target, tokenizer), []
    generate_decode(target, prompts[0], 4, 0.0, eos)  # warm-up
    begin, plain_tokens = time.process_time(), 0
    for prompt in prompts:
        plain_tokens += len(generate_decode(target, prompt, args.new_tokens, 0.0, eos).tokens)
    plain_ms = 1000 * (time.process_time() - begin) / plain_tokens
    print(json.dumps({"plain_ms_per_token": round(plain_ms, 1)}), flush=True)
    for folder in args.drafts:
        family, draft = load_draft(str(folder), target)
        for mode, spec in family.fit_modes(draft, family.decode_modes(4, 4, 16, 0.0)).items():
            warm_up(target, family, draft, spec, prompts[0], 4)  # the first decode's one-time costs, uncharged
            timed, steps, tokens, begin = TimedProposer(family.proposer(draft, spec)), 0, 0, time.process_time()
            for prompt in prompts:
                result = speculative_generate(target, timed, prompt, args.new_tokens, eos_token_id=eos)
                steps, tokens = steps + result.target_forwards, tokens + len(result.tokens)
            step_ms = 1000 * (time.process_time() - begin) / steps
            rows.append({
                "draft": str(folder), "family": family.name, "mode": mode, "steps": steps,
                "acceptance_length": round(tokens / steps, 3),
                "nodes_per_proposal": round(timed.nodes / timed.proposals, 1),
                "draft_ms_per_step": round(1000 * timed.cpu_s / steps, 1),
                "draft_ms_per_proposed_token": round(1000 * timed.cpu_s / timed.nodes, 2),
                "step_ms": round(step_ms, 1),
                "speedup_over_plain": round(tokens / steps * plain_ms / step_ms, 2),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_argv = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pool = sub.add_parser("make-pool", help="run the target over the first teacher batches, once")
    pool.add_argument("--pool", type=Path, required=True)
    pool.add_argument("--batches", type=int, default=60)
    r = sub.add_parser("run", help="train one variant on the pool within --cpu-seconds")
    r.add_argument("--pool", type=Path, required=True)
    r.add_argument("--cpu-seconds", type=float, default=840, help="the CPU seconds charged (840: 14 minutes)")
    r.add_argument("--steps", type=int, help="train exactly this many steps instead (equal steps, not CPU)")
    r.add_argument("--save", type=Path, help="write the draft here (for eval --draft)")
    r.add_argument("--eval-prompts", type=int, default=8, help="per set")
    r.add_argument("--eval-sets", nargs="+", default=["sharegpt"], help="eval's sets (first turns)")
    r.add_argument("--eval-new-tokens", type=int, default=64)
    r.add_argument("--out", type=Path, help="also write the report (JSON) here")
    cost = sub.add_parser("cost", help="the draft's CPU per step and per proposed token, per mode, of saved drafts")
    cost.add_argument("drafts", nargs="+", type=Path)
    cost.add_argument("--prompts", type=int, default=4)
    cost.add_argument("--new-tokens", type=int, default=48)
    args = p.parse_args(own)
    if args.command == "cost":
        draft_cost(args)
        return 0
    if args.command == "make-pool":
        make_pool(args.batches, args.pool, train_argv)
        return 0
    report = run(args, train_argv)
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
