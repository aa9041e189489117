"""``bench peers-train --compare losses``: our losses and SpecForge's full-vocabulary KL at equal steps
for several seeds, each draft evaluated; the mean and spread per set, and whether a loss beats top-k KL
beyond the spread of the seeds."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch

from torchspec_ext.bench.peers_context import SETS, SPECFORGE_KL, Settings, make_context, slug
from torchspec_ext.bench.peers_eval import eval_cells, eval_columns, evaluate
from torchspec_ext.bench.peers_recipes import RECIPES
from torchspec_ext.bench.peers_timing import train
from torchspec_ext.bench.report import Column, Report, environment_header, fmt_fixed, fmt_num


def compare_losses(args, settings: Settings) -> Report:
    """Each of ``args.losses`` trained ``settings.steps`` steps for each seed, then evaluated."""
    import gc

    from torchspec_ext.training.budget import Plan

    rows: list[dict] = []
    described: dict[str, Any] = {}
    for seed in args.seeds:
        context = make_context(args, settings, seed)
        plan = Plan(settings.steps, min(math.ceil(settings.steps / args.epochs), context.available))
        for loss in args.losses:
            recipe = RECIPES["specforge"](context) if loss == SPECFORGE_KL else RECIPES["ours"](context, loss)
            described.setdefault("specforge" if loss == SPECFORGE_KL else "ours", recipe.describe())
            name = f"{loss} seed {seed}"
            trainer = recipe.trainer(plan.steps, args.specforge_lr if loss == SPECFORGE_KL else None)
            trained = train(recipe, trainer, plan, seed, None, name)
            draft = trainer.export(context.workdir / slug(loss))
            row = {
                "loss": loss,
                "seed": seed,
                "lr": trainer.lr,
                "steps": trained.steps,
                "batches": trained.batches,
                "minutes": trained.seconds / 60,
                "s_per_step": trained.seconds / max(1, trained.steps),
                "first_loss": trained.losses[0],
                "last_loss": trained.losses[-1],
            }
            rows.append(row | eval_cells(evaluate(context, draft, name)))
        del context
        gc.collect()
    rows += loss_summary(rows, args.losses)
    report = Report("peers-train (losses)", {}, loss_columns(), rows)
    report.header = (
        environment_header(torch.device("cpu"), "each step timed with time.monotonic")
        | {
            "case": f"{settings.steps} steps per run over {math.ceil(settings.steps / args.epochs)} teacher batches "
            f"({args.batch_size} x up to {settings.max_length} tokens, each trained on {args.epochs} times), seeds "
            f"{args.seeds}; eval on {', '.join(SETS)}, {settings.limit} prompts per set, {settings.max_new_tokens} new "
            "tokens per turn (the seed also picks the held-out split and the prompts)",
            "losses": f"ours: {', '.join(x for x in args.losses if x != SPECFORGE_KL)} (train's --loss); "
            f"{SPECFORGE_KL}: SpecForge's recipe, its full-vocabulary KL",
            "beats topk_kl": "sets (tree acceptance length) where the loss's worst seed beats topk_kl's best seed",
            "drafts": str(Path(args.out)),
        }
        | {f"recipe {k}": v for k, v in described.items()}
    )
    return report


def loss_summary(rows: list[dict], losses: list[str]) -> list[dict]:
    """Per loss: the mean over seeds of every eval cell, the spread (max - min) of the acceptance
    lengths, and the sets where its worst seed beats top-k KL's best seed (tree acceptance length)."""
    keys = [c.key for c in eval_columns()]
    by_loss = {loss: [r for r in rows if r["loss"] == loss] for loss in losses}
    summary = []
    for loss, runs in by_loss.items():
        mean = {"loss": f"{loss}: mean", "seed": "all"}
        spread = {"loss": f"{loss}: spread", "seed": "max - min"}
        for key in keys:
            values = [r[key] for r in runs if r.get(key) is not None]
            mean[key] = statistics.mean(values) if values else None
            if values and not key.endswith("speed-up"):
                spread[key] = max(values) - min(values)
        if loss != "topk_kl" and by_loss.get("topk_kl"):
            wins = [
                name
                for name in SETS
                if all(r.get(f"{name} tree") is not None for r in runs + by_loss["topk_kl"])
                and min(r[f"{name} tree"] for r in runs) > max(r[f"{name} tree"] for r in by_loss["topk_kl"])
            ]
            mean["beats_kl"] = ", ".join(wins) or "no set"
        summary += [mean, spread]
    return summary


def loss_columns() -> list[Column]:
    return [
        Column("loss", "loss"),
        Column("seed", "seed"),
        Column("lr", "lr", fmt_num()),
        Column("steps", "steps"),
        Column("batches", "teacher batches"),
        Column("minutes", "minutes", fmt_fixed(1)),
        Column("s_per_step", "s / step", fmt_num()),
        Column("first_loss", "first loss", fmt_num()),
        Column("last_loss", "last loss", fmt_num()),
        *eval_columns(),
        Column("beats_kl", "beats topk_kl beyond the spread"),
    ]
