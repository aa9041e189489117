"""The run's plan (:class:`Plan`: how many steps, over how many teacher batches a pass) and, under
``--time-budget``, how it is made and kept.

The run measures what it needs first (a round of teacher batches, a training step, a decoding step
for the final evaluation) and plans from those figures; as it goes it times its own steps and
evaluations and revises the step count (:class:`BudgetKeeper`), so that it ends within its budget
instead of where costs measured in its first minute said it would. The learning-rate schedule
follows the plan's step count.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, replace


class BudgetError(ValueError):
    """The budget cannot hold even the smallest run."""


@dataclass(frozen=True)
class Costs:
    """Seconds, measured on this machine."""

    spent: float  # since the run started (loading, the first round of teacher batches)
    teacher_batch: float  # one teacher batch
    step: float  # one training step (and its share of the periodic evaluations)
    evaluation: float  # the final evaluation and saving the draft


@dataclass(frozen=True)
class Plan:
    """``steps`` optimiser steps over ``teacher_batches`` teacher batches a pass (a replayed stream
    passes over them as often as the steps need). Saved with every checkpoint, so a resumed run
    keeps the plan of the run it continues."""

    steps: int
    teacher_batches: int

    def state_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_state(state: dict) -> Plan:
        return Plan(int(state["steps"]), int(state["teacher_batches"]))

    def describe(self, costs: Costs, budget_s: float) -> str:
        teacher = self.teacher_batches * costs.teacher_batch
        train = self.steps * costs.step
        return (
            f"{self.teacher_batches} teacher batches (~{teacher / 60:.1f} min at {costs.teacher_batch:.2f} s) and "
            f"{self.steps} training steps (~{train / 60:.1f} min at {costs.step:.2f} s, held-out checks included), "
            f"final evaluation ~{costs.evaluation / 60:.1f} min, {costs.spent / 60:.1f} min spent so far: "
            f"{budget_s / 60:.1f} min"
        )


MARGIN = 0.9  # of the time left, planned for at the start: the first costs are the least certain


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
        return Plan(max(1, int(left // costs.step)), ready)
    more = (left - ready * epochs * costs.step) // (costs.teacher_batch + epochs * costs.step)
    more = int(more) // round_batches * round_batches
    batches = min(available_batches, ready + more)
    return Plan(batches * epochs, batches)


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
    made = online.prepare(ready)
    teacher_s = (time.monotonic() - begin) / ready
    evaluation = evaluation_seconds(target, prompt, decoded_tokens)
    step = training_step_seconds(make_trainer(), made[:4])
    if eval_interval:  # the held-out evaluations every eval_interval steps, spread over the steps
        step += evaluation / eval_interval
    return Costs(spent=time.monotonic() - started, teacher_batch=teacher_s, step=step, evaluation=evaluation), ready


class BudgetKeeper:
    """Keeps a plan within its time: ``end_by`` (``time.monotonic()``) is when the final evaluation
    must start. Every 4% of the plan's steps (at least 5) it compares the time left with what the
    remaining steps cost at the rates measured in this process (steps that make a new teacher batch
    and replayed steps timed apart) and revises the step count: more replayed steps when there is
    time, fewer when there is not (a change under 5% is left alone: the rates are noisy).
    ``evaluation``, the final evaluation's estimate in seconds, becomes what the periodic
    evaluations measure."""

    def __init__(
        self, plan: Plan, budget_end: float, evaluation: float, replays: bool, available: int, first_step: int
    ):
        """``replays``: the stream replays the plan's teacher batches (else every step makes one, and
        at most ``available`` steps have data)."""
        self.plan, self.budget_end, self.evaluation, self.replays = plan, budget_end, evaluation, replays
        self.available = available
        self.timed = {True: [0.0, 0], False: [0.0, 0]}  # new teacher batch? -> [seconds, steps]
        self.last_step, self.last_time = first_step, time.monotonic()

    @property
    def end_by(self) -> float:
        return self.budget_end - self.evaluation

    def new_batch(self, step: int) -> bool:
        """Whether step ``step`` (from 0) runs the teacher (a replayed stream's first pass; every step otherwise)."""
        return not self.replays or step < self.plan.teacher_batches

    def step_done(self, step: int, evaluation_s: float | None = None) -> Plan:
        """Records step ``step`` (counted from 1) and the seconds of an evaluation it ran, if any;
        returns the plan, revised every ``interval`` steps."""
        now = time.monotonic()
        seconds, self.last_time = now - self.last_time - (evaluation_s or 0.0), now
        kind = self.timed[self.new_batch(step - 1)]
        kind[0] += seconds
        kind[1] += 1
        if evaluation_s is not None:
            self.evaluation = evaluation_s + 5.0  # the final evaluation does the same, and saves the draft
        if step % max(5, self.plan.steps // 25) == 0 and step < self.plan.steps:
            self._revise(step, now)
        return self.plan

    def _rate(self, new: bool) -> float | None:
        seconds, steps = self.timed[new]
        return seconds / steps if steps else None

    def _revise(self, step: int, now: float) -> None:
        left = self.end_by - now
        new_rate = self._rate(True) or self._rate(False)
        if new_rate is None:
            return
        if not self.replays:
            steps = min(step + int(left // new_rate), self.available)
        else:
            new_steps = max(0, self.plan.teacher_batches - step)
            if left < new_steps * new_rate:  # not even the first pass fits: end it early
                steps = step + int(left // new_rate)
            else:  # the first pass, then as many replayed steps as fit
                steps = step + new_steps + int((left - new_steps * new_rate) // (self._rate(False) or new_rate))
        steps = max(steps, step + 1)
        if abs(steps - self.plan.steps) >= max(2, self.plan.steps // 20):  # 5%: the rates are noisy
            print(
                f"[train] --time-budget: plan revised at step {step}: {self.plan.steps} -> {steps} steps "
                f"({left / 60:.1f} min left before the final evaluation)",
                file=sys.stderr,
            )
            self.plan = replace(self.plan, steps=steps)
