"""The draft's optimiser and learning-rate schedule, and one training step on a teacher batch; the
objective itself is the draft family's (the draft module's ``forward``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from torchspec_ext.drafts.base import LossFunction
from torchspec_ext.teacher import TeacherBatch


@dataclass
class StepResult:
    loss: float
    step_losses: list[float]
    step_accuracies: list[float]
    tokens: int  # the positions of the first kind trained on

    @property
    def acceptance_estimate(self) -> float:
        """1 + sum over steps of the product of per-step accuracies: the chain acceptance length
        if each step's accuracy were its conditional acceptance rate."""
        total, run = 1.0, 1.0
        for acc in self.step_accuracies:
            run *= acc
            total += run
        return total


def warmup_cosine(warmup: int, total: Callable[[], int]):
    """The learning-rate factor of step ``step``: linear warm-up, then cosine down to a tenth at
    ``total()`` steps (read at each step: a time budget's plan may be revised as the run goes)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total() - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class DraftTrainer:
    """A draft's AdamW optimiser, its warm-up + cosine schedule over ``total_steps``, and the step:
    the family's objective (``draft(batch, loss, options)``), backward, clipping, update."""

    def __init__(
        self,
        draft: torch.nn.Module,
        options,
        *,
        loss: LossFunction,
        lr: float,
        warmup_steps: int,
        total_steps: int,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        ddp_group=None,
    ):
        self.draft, self.options, self.loss, self.grad_clip = draft, options, loss, grad_clip
        self.model = draft
        if ddp_group is not None:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(draft, process_group=ddp_group)
        self.total_steps = total_steps
        params = [p for p in draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
        factor = warmup_cosine(warmup_steps, lambda: self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def step(self, batch: TeacherBatch) -> StepResult:
        """One optimiser step."""
        objective = self.model(batch, self.loss, self.options)
        if not torch.isfinite(objective.total):
            raise FloatingPointError("loss is not finite")
        self.optimizer.zero_grad(set_to_none=True)
        objective.total.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.draft.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        losses = [x.item() for x in objective.losses]
        return StepResult(objective.total.item(), losses, objective.accuracies, objective.tokens)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
