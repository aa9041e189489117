"""``bench peers-train``: SpecForge's training recipe against ours for one draft family (``--family``:
EAGLE-3, the default, or DFlash), on the same target, data split, batch order and CPU minutes, each
draft then measured by ``eval`` with the same decoder.

Both recipes train on one process's target (the embedded SmolLM2-135M-Instruct unless ``--target``),
on the token batches of one :class:`~torchspec_ext.training.batches.Batches` (our split of the data,
our batch order, ``--batch-size`` x ``--max-length``), each teacher batch trained on ``--epochs``
times in the same seeded order (our ``--epochs`` replay; SpecForge's offline records). Our recipe
is ``python -m torchspec_ext.train --draft-family F``'s draft, teacher and trainer; SpecForge's is in
:mod:`torchspec_ext.bench.specforge_recipes`. A recipe is anything with ``make_batch(j)`` (teacher
batch ``j``, running the target) and ``trainer(steps, lr)`` (a fresh draft whose trainer has
``step(batch)`` and ``export(folder)``, the folder in our layout), listed in :data:`RECIPES`.

``--compare recipes`` (the default):

1. throughput: each recipe's steps on the same new batches (the target's forward included), then
   replayed, in turns (a changing load weighs on both): seconds per new batch and per replayed
   step, tokens/s, and peak memory;
2. training at equal minutes: every run gets ``--minutes`` of wall clock, planned from step 1's
   costs as ``train --time-budget`` plans (the learning-rate schedule over the planned steps) and
   stopped at the budget; ours once, SpecForge at each ``--specforge-lrs`` (its default first);
3. the SpecForge learning rate with the best acceptance length on held-out *training* prompts
   (conversations no run reaches, so the sets below stay unseen);
4. ``eval`` on MT-Bench, HumanEval and held-out ShareGPT: ours, SpecForge at its default, at the best.

``--compare losses``: our losses (``--losses``: top-k KL, hard labels, the LK losses) and SpecForge's
full-vocabulary KL through its recipe (``specforge-kl``), at ``--steps`` equal steps, for each of
``--seeds``, each evaluated; the mean and spread over the seeds per set, and whether each loss beats
top-k KL beyond the spread. docs/benchmarks.md says what differs from ``specforge train`` and why.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from torchspec_ext.bench.common import Goal, Skipped, resolve_device, verdict
from torchspec_ext.bench.common import target as target_cell
from torchspec_ext.bench.peers_context import MODES, OUR_LOSSES, SETS, SPECFORGE_KL, Settings, make_context, slug
from torchspec_ext.bench.peers_eval import eval_cells, eval_columns, evaluate, validation_acceptance
from torchspec_ext.bench.peers_losses import compare_losses
from torchspec_ext.bench.peers_recipes import RECIPES, Recipe
from torchspec_ext.bench.peers_timing import measure_throughput, plan_for, train
from torchspec_ext.bench.report import TARGET_COLUMNS, Column, Report, environment_header, fmt_fixed, fmt_num

FAMILIES = ("eagle3", "dflash")  # those SpecForge's recipes here train
TARGET_SPEEDUP = 1.5  # ours / SpecForge's tokens per second on new batches
DEFAULT_OUT = Path("torchspec_out") / "peers"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in (*OUR_LOSSES, SPECFORGE_KL)]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown loss(es) {', '.join(unknown) or '(none)'}: choose from {', '.join((*OUR_LOSSES, SPECFORGE_KL))}"
        )
    return names


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compare", choices=("recipes", "losses"), default="recipes")
    parser.add_argument(
        "--family", choices=FAMILIES, default="eagle3", help="the draft family both recipes train (--compare recipes)"
    )
    parser.add_argument(
        "--draft-layers",
        type=int,
        default=None,
        help="--family dflash: our draft's decoder layers (default: train's, 5; SpecForge's recipe keeps its 1)",
    )
    parser.add_argument("--target", default=None, help="a Hugging Face causal-LM directory (default: SmolLM2-135M)")
    parser.add_argument("--data", default=None, help="chat JSON/JSONL (default: ShareGPT)")
    parser.add_argument("--target-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per conversation (default 512; quick 128)")
    parser.add_argument("--epochs", type=int, default=3, help="times each teacher batch is trained on (ours on CPU: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every recipe (default: as set)")
    parser.add_argument("--seed", type=int, default=0, help="--compare recipes: the seed of the split, order, drafts")
    parser.add_argument("--minutes", type=float, default=None, help="per training run (default 14; quick 0.5)")
    parser.add_argument(
        "--specforge-lrs",
        type=_floats,
        default=None,
        help="SpecForge's learning-rate sweep (default: its own default, then 3e-4,1e-3,3e-3; quick: default,1e-3)",
    )
    parser.add_argument(
        "--specforge-dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="SpecForge's training dtype (default: its bfloat16 where the CPU multiplies it natively, else float32)",
    )
    parser.add_argument("--throughput-batches", type=int, default=None, help="timed new batches (default 3; quick 1)")
    parser.add_argument("--lr", type=float, default=None, help="our learning rate (default: train's)")
    parser.add_argument("--losses", type=_names, default=list((*OUR_LOSSES, SPECFORGE_KL)), help="--compare losses")
    parser.add_argument("--seeds", type=_ints, default=[0, 1], help="--compare losses: seeds (comma-separated)")
    parser.add_argument(
        "--steps", type=int, default=None, help="--compare losses: steps per run (default 120; quick 2)"
    )
    parser.add_argument(
        "--specforge-lr", type=float, default=None, help="--compare losses: SpecForge's rate (default: its default)"
    )
    parser.add_argument("--limit", type=int, default=None, help="eval prompts per set (default 16; quick 1)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="eval tokens per turn (default 64; quick 16)")
    parser.add_argument("--validation-prompts", type=int, default=None, help="to pick SpecForge's rate (default 8)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"drafts and eval reports (default {DEFAULT_OUT})"
    )


def run(args) -> Report:
    from torchspec_ext.bench.specforge_recipes import specforge_problem
    from torchspec_ext.train import subnormals_flushed

    if args.draft_layers is not None and args.family != "dflash":
        raise SystemExit("bench peers-train --draft-layers sets our DFlash draft's layers: add --family dflash")
    if args.compare == "losses" and args.family != "eagle3":
        raise SystemExit("bench peers-train --compare losses compares EAGLE-3 losses: leave --family eagle3")
    problem = specforge_problem()
    if problem:
        raise Skipped(problem)
    if resolve_device(args.device).type != "cpu":
        raise Skipped("peers-train runs on the CPU only so far (SpecForge's GPU path is its Triton loss and SGLang)")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.of(args)
    load = os.getloadavg()[0]
    with subnormals_flushed():  # as train runs; a process-wide CPU flag, so for both recipes
        report = compare_recipes(args, settings) if args.compare == "recipes" else compare_losses(args, settings)
    report.header["load average (1 min) at start, end"] = (
        f"{load:.1f}, {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    (Path(args.out) / f"{args.compare}.json").write_text(json.dumps(report.to_json(), indent=2, default=str))
    return report


def compare_recipes(args, settings: Settings) -> Report:
    context = make_context(args, settings, args.seed)
    ours, specforge = RECIPES["ours"](context), RECIPES["specforge"](context)
    lrs = settings.specforge_lrs or [specforge.default_lr, *([1e-3] if args.quick else [3e-4, 1e-3, 3e-3])]
    lrs = list(dict.fromkeys(lrs))
    throughput = measure_throughput(context, {"ours": ours, "specforge": specforge}, settings.throughput_batches)
    runs: list[tuple[Recipe, float | None, dict]] = [(ours, None, throughput["ours"])]
    runs += [(specforge, lr, throughput["specforge"]) for lr in lrs]
    rows = []
    for recipe, lr, costs in runs:
        name = recipe.name if lr is None else f"{recipe.name} lr={lr:g}"
        row = {"recipe": name, "lr": recipe.default_lr if lr is None else lr} | {k: costs[k] for k in costs}
        plan = plan_for(costs, settings.minutes, args.epochs, context.available)
        trainer = recipe.trainer(plan.steps, lr)
        trained = train(recipe, trainer, plan, context.seed, 60 * settings.minutes, name)
        trained.draft = trainer.export(context.workdir / slug(name))
        row |= {
            "batches": trained.batches,
            "steps": f"{trained.steps}/{trained.planned_steps}",
            "minutes": trained.seconds / 60,
            "first_loss": trained.losses[0] if trained.losses else None,
            "last_loss": trained.losses[-1] if trained.losses else None,
            "validation_al": validation_acceptance(context, trained.draft, settings.max_new_tokens),
            "draft": str(trained.draft),
        }
        if trained.steps < trained.planned_steps:
            row["note"] = f"the budget ended it at step {trained.steps} of {trained.planned_steps}"
        rows.append(row)
    swept = [r for r in rows[1:] if r.get("validation_al") is not None]
    best = max(swept, key=lambda r: r["validation_al"]) if swept else None
    evaluated = [rows[0], rows[1]] + ([best] if best is not None and best is not rows[1] else [])
    for row in evaluated:
        if row.get("draft"):
            row |= eval_cells(evaluate(context, Path(row["draft"]), row["recipe"]))
    if best is not None:
        best["recipe"] += " (best of the sweep)"
    ours_row = rows[0]
    ours_row["speedup"] = throughput["ours"]["tokens_per_s"] / throughput["specforge"]["tokens_per_s"]
    peers = [r for r in evaluated[1:] if r.get("draft")]
    ratios = [
        ours_row[key] / r[key]
        for r in peers
        for key in (f"{s} {m}" for s in SETS for m in MODES)
        if ours_row.get(key) is not None and r.get(key)
    ]
    ours_row["al_ratio"] = min(ratios) if ratios else None
    speed = Goal(
        f"tokens/s per new batch ≥ {TARGET_SPEEDUP}x SpecForge's", lambda r: r["speedup"] < TARGET_SPEEDUP, "speed"
    )
    accepts = Goal("acceptance ≥ SpecForge's on every set", lambda r: (r["al_ratio"] or 0) < 1, "acceptance")
    goals = [] if args.quick else [speed, accepts]
    ours_row["target"], ours_row["result"] = target_cell(goals), verdict(goals, ours_row)
    report = Report("peers-train", {}, recipe_columns(), [{k: v for k, v in r.items() if k != "draft"} for r in rows])
    report.header = environment_header(
        torch.device("cpu"), "each step timed with time.monotonic, the target's forward included"
    ) | {
        "case": f"{args.family} drafts; same batches ({args.batch_size} x up to {settings.max_length} tokens, "
        f"seed {args.seed}), each "
        f"trained on {args.epochs} times; {settings.minutes:g} min per training run; eval on {', '.join(SETS)}, "
        f"{settings.limit} prompts per set, {settings.max_new_tokens} new tokens per turn",
        "ours": ours.describe(),
        "specforge": specforge.describe() | {"learning rates swept": lrs},
        "throughput": f"median of {settings.throughput_batches} new batches and as many replayed steps, recipes in "
        "turns, after one warm-up batch",
        "drafts": str(context.workdir),
    }
    return report


def recipe_columns() -> list[Column]:
    return [
        Column("recipe", "recipe"),
        Column("lr", "lr", fmt_num()),
        Column("new_s", "s / new batch", fmt_num()),
        Column("teacher_s", "of which teacher s", fmt_num()),
        Column("replay_s", "s / replayed step", fmt_num()),
        Column("tokens_per_s", "tokens/s (new)", fmt_num()),
        Column("replay_tokens_per_s", "tokens/s (replayed)", fmt_num()),
        Column("peak_mib", "peak MiB", fmt_num()),
        Column("speedup", "speed-up (new)", fmt_fixed(2, "x")),
        Column("batches", "teacher batches"),
        Column("steps", "steps done/planned"),
        Column("minutes", "minutes", fmt_fixed(1)),
        Column("first_loss", "first loss", fmt_num()),
        Column("last_loss", "last loss", fmt_num()),
        Column("validation_al", "validation AL", fmt_fixed(2)),
        *eval_columns(),
        Column("al_ratio", "AL / SpecForge's (min)", fmt_fixed(2)),
        Column("note", "note"),
        *TARGET_COLUMNS,
    ]
