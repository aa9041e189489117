"""``--time-budget``: how many teacher batches and training steps fit in the minutes given.

The run measures what it needs first (a round of teacher batches, a training step, a decoding
step for the final evaluation) and plans from those figures; the plan is then a fixed step
count, so the learning-rate schedule, the passes and a resume are what they are without it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


class BudgetError(ValueError):
    """The budget cannot hold even the smallest run."""


@dataclass(frozen=True)
class Costs:
    """Seconds, measured on this machine."""

    spent: float  # since the run started (loading, the first round of teacher batches)
    teacher_batch: float  # one teacher batch
    step: float  # one training step
    evaluation: float  # the final evaluation and saving the draft


@dataclass(frozen=True)
class Plan:
    teacher_batches: int
    steps: int

    def describe(self, costs: Costs, budget_s: float) -> str:
        teacher = self.teacher_batches * costs.teacher_batch
        train = self.steps * costs.step
        return (
            f"{self.teacher_batches} teacher batches (~{teacher / 60:.1f} min at {costs.teacher_batch:.2f} s) and "
            f"{self.steps} training steps (~{train / 60:.1f} min at {costs.step:.2f} s, held-out checks included), "
            f"final evaluation ~{costs.evaluation / 60:.1f} min, {costs.spent / 60:.1f} min spent so far: "
            f"{budget_s / 60:.1f} min"
        )


MARGIN = 0.9  # of the time left, planned for: the costs measured at the start vary during a run


def plan_run(
    budget_s: float, costs: Costs, epochs: int, round_batches: int, ready_batches: int, available_batches: int
) -> Plan:
    """The most teacher batches (whole rounds of ``round_batches``, at most ``available_batches``)
    that, each trained on ``epochs`` times, fit in ``MARGIN`` of what ``budget_s`` leaves after
    the evaluation; the first ``ready_batches`` are already made (their cost is in
    ``costs.spent``). Raises BudgetError when not even one training step fits."""
    left = MARGIN * (budget_s - costs.spent - costs.evaluation)
    if left < costs.step:
        needed = costs.spent + costs.evaluation + costs.step / MARGIN
        raise BudgetError(
            f"{budget_s / 60:.1f} minutes cannot hold one training step here: loading and the first "
            f"teacher batches took {costs.spent:.0f} s, a step takes {costs.step:.1f} s and the final "
            f"evaluation about {costs.evaluation:.0f} s; give at least "
            f"{math.ceil(needed / 60)} minutes"
        )
    ready = min(ready_batches, available_batches)
    if left < ready * epochs * costs.step:  # not even the batches made so far, each pass of them
        return Plan(ready, max(1, int(left // costs.step)))
    more = (left - ready * epochs * costs.step) // (costs.teacher_batch + epochs * costs.step)
    more = int(more) // round_batches * round_batches
    batches = min(available_batches, ready + more)
    return Plan(batches, batches * epochs)


def evaluation_seconds(target, prompt: list[int], decoded_tokens: int) -> float:
    """About what the final evaluation takes: each of its ``decoded_tokens`` (prompts x new tokens
    x modes) at roughly one plain decoding step and a half (measured on ``prompt``), and saving
    the draft."""
    from torchspec_ext.eval import plain_seconds_per_token

    return 1.5 * plain_seconds_per_token(target, prompt, tokens=8, repeats=1) * decoded_tokens + 5.0


def training_step_seconds(trainer, batches: list) -> float:
    """Mean seconds of ``trainer.step`` over ``batches`` (give it a throw-away copy of the draft),
    after two warm-up steps: the first steps of a process run slower while its allocator and
    caches fill."""
    for batch in batches[:2]:
        trainer.step(batch)
    begin = time.monotonic()
    for batch in batches:
        trainer.step(batch)
    return (time.monotonic() - begin) / len(batches)


def measure_costs(
    started: float, online, make_trainer, target, prompt: list[int], decoded_tokens: int, eval_interval: int
) -> tuple[Costs, int]:
    """(costs, batches made): the first round of ``online``'s teacher batches (at least 4: their
    costs vary with their lengths; kept for the run), the final evaluation, and a training step
    (on ``make_trainer()``) plus its share of the evaluations every ``eval_interval`` steps."""
    ready = min(len(online.batches), max(online.round_batches, 4))
    begin = time.monotonic()
    for position in range(0, ready, online.round_batches):
        online.prefetch(position)
    teacher_s = (time.monotonic() - begin) / ready
    evaluation = evaluation_seconds(target, prompt, decoded_tokens)
    step = training_step_seconds(make_trainer(), [online.decoded[p] for p in range(min(4, ready))])
    if eval_interval:  # the held-out evaluations every eval_interval steps, spread over the steps
        step += evaluation / eval_interval
    return Costs(spent=time.monotonic() - started, teacher_batch=teacher_s, step=step, evaluation=evaluation), ready
