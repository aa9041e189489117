"""``--time-budget``: how many teacher batches and training steps fit in the minutes given.

The run measures what it needs first (a round of teacher batches, a training step, a decoding
step for the final evaluation) and plans from those figures; the plan is then a fixed step
count, so the learning-rate schedule, the passes and a resume are what they are without it.
"""

from __future__ import annotations

import math
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
        return (f"{self.teacher_batches} teacher batches (~{teacher / 60:.1f} min at {costs.teacher_batch:.2f} s) and "
                f"{self.steps} training steps (~{train / 60:.1f} min at {costs.step:.2f} s, held-out checks included), "
                f"final evaluation ~{costs.evaluation / 60:.1f} min, {costs.spent / 60:.1f} min spent so far: {budget_s / 60:.1f} min")


MARGIN = 0.9  # of the time left, planned for: the costs measured at the start vary during a run


def plan_run(budget_s: float, costs: Costs, epochs: int, round_batches: int, ready_batches: int,
             available_batches: int) -> Plan:
    """The most teacher batches (whole rounds of ``round_batches``, at most ``available_batches``)
    that, each trained on ``epochs`` times, fit in ``MARGIN`` of what ``budget_s`` leaves after
    the evaluation; the first ``ready_batches`` are already made (their cost is in
    ``costs.spent``). Raises BudgetError when not even one training step fits."""
    left = MARGIN * (budget_s - costs.spent - costs.evaluation)
    if left < costs.step:
        needed = costs.spent + costs.evaluation + costs.step / MARGIN
        raise BudgetError(f"{budget_s / 60:.1f} minutes cannot hold one training step here: loading and the first "
                          f"teacher batches took {costs.spent:.0f} s, a step takes {costs.step:.1f} s and the final "
                          f"evaluation about {costs.evaluation:.0f} s; give at least "
                          f"{math.ceil(needed / 60)} minutes")
    ready = min(ready_batches, available_batches)
    if left < ready * epochs * costs.step:  # not even the batches made so far, each pass of them
        return Plan(ready, max(1, int(left // costs.step)))
    more = (left - ready * epochs * costs.step) // (costs.teacher_batch + epochs * costs.step)
    more = int(more) // round_batches * round_batches
    batches = min(available_batches, ready + more)
    return Plan(batches, batches * epochs)
