"""How ``bench peers-train`` runs a recipe: its throughput on the same new batches as the other recipes,
the plan of a run of fixed minutes (``train --time-budget``'s), and the run itself, in our replay order."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchspec_ext.bench.common import peak_extra_bytes
from torchspec_ext.bench.peers_context import Context
from torchspec_ext.bench.peers_recipes import Recipe, Trainer


@dataclass
class Trained:
    """One training run: what it planned, did and took, and where its draft is."""

    name: str
    lr: float
    planned_steps: int
    planned_batches: int
    steps: int = 0
    batches: int = 0
    seconds: float = 0.0
    new_seconds: list[float] = field(default_factory=list)  # steps that ran the target too
    replay_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    draft: Path | None = None


def train(recipe: Recipe, trainer: Trainer, plan, seed: int, budget_s: float | None, name: str) -> Trained:
    """``plan.steps`` steps over ``plan.teacher_batches`` teacher batches, each pass in the seeded order our
    ``--epochs`` replay uses (``streams.Passes``), every step timed (the teacher's forward included when the
    step makes its batch); stops early when ``budget_s`` is spent."""
    from torchspec_ext.training.streams import Passes

    kept: dict[int, Any] = {}

    def fetch(j: int):
        if j not in kept:
            kept[j] = recipe.make_batch(j)
        return kept[j]

    passes = Passes(plan.teacher_batches, seed, fetch)
    done = Trained(name, trainer.lr, plan.steps, plan.teacher_batches)
    began = time.monotonic()
    for i in range(plan.steps):
        if budget_s is not None and time.monotonic() - began >= budget_s:
            break
        made = len(kept)
        start = time.monotonic()
        done.losses.append(trainer.step(passes.batch(i)))
        (done.new_seconds if len(kept) > made else done.replay_seconds).append(time.monotonic() - start)
        done.steps += 1
        print(f"[bench peers-train] {name}: step {done.steps}/{plan.steps} loss {done.losses[-1]:.4g}", file=sys.stderr)
    done.batches, done.seconds = len(kept), time.monotonic() - began
    return done


def measure_throughput(context: Context, recipes: dict[str, Recipe], count: int) -> dict[str, dict]:
    """Per recipe: seconds per new batch (target forward + step), its teacher and step parts, seconds
    per replayed step, tokens/s of each, and the peak memory of a new batch's step beyond what was
    resident before it, on the same ``count`` batches after one warm-up batch, recipes in turns."""
    trainers = {name: recipe.trainer(4 * (count + 1)) for name, recipe in recipes.items()}
    kept: dict[str, list] = {name: [] for name in recipes}
    timings = {name: {"teacher": [], "step": [], "replay": [], "peak": None} for name in recipes}

    def new_batch(name: str, j: int) -> None:
        start = time.perf_counter()
        batch = recipes[name].make_batch(j)
        middle = time.perf_counter()
        trainers[name].step(batch)
        timings[name]["teacher"].append(middle - start)
        timings[name]["step"].append(time.perf_counter() - middle)
        kept[name].append(batch)

    for name in recipes:  # the warm-up: first calls pay one-time costs
        trainers[name].step(recipes[name].make_batch(0))
    for j in range(1, count + 1):
        for name in recipes:
            print(f"[bench peers-train] throughput: {name}, new batch {j}/{count}", file=sys.stderr)
            if j == 1:
                peak = peak_extra_bytes(new_batch, (name, j), torch.device("cpu"))
                timings[name]["peak"] = peak
            else:
                new_batch(name, j)
    for j in range(count):
        for name in recipes:
            start = time.perf_counter()
            trainers[name].step(kept[name][j])
            timings[name]["replay"].append(time.perf_counter() - start)
    tokens = statistics.mean(context.tokens(j) for j in range(1, count + 1))
    out = {}
    for name, t in timings.items():
        teacher, step, replay = (statistics.median(t[k]) for k in ("teacher", "step", "replay"))
        out[name] = {
            "new_s": teacher + step,
            "teacher_s": teacher,
            "step_s": step,
            "replay_s": replay,
            "tokens_per_s": tokens / (teacher + step),
            "replay_tokens_per_s": tokens / replay,
            "peak_mib": None if t["peak"] is None else t["peak"] / 2**20,
        }
    return out


def plan_for(costs: dict, minutes: float, epochs: int, available: int):
    """``train --time-budget``'s plan (``budget.plan_run``) from a recipe's measured costs; at least one
    teacher batch (the run's deadline then cuts it short where even that does not fit)."""
    from torchspec_ext.training.budget import Costs, Plan, plan_run

    teacher = max(0.0, costs["new_s"] - costs["replay_s"])
    measured = Costs(spent=0.0, teacher_batch=teacher, step=costs["replay_s"], evaluation=0.0)
    try:
        plan = plan_run(60 * minutes, measured, epochs, 1, 0, available)
    except ValueError:  # BudgetError: not even one step fits
        plan = Plan(0, 0)
    return plan if plan.teacher_batches >= 1 else Plan(epochs, 1)
