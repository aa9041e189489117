"""The draft, its optimiser and learning-rate schedule, and one training step on a teacher batch."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from torchspec_ext import ops, reference
from torchspec_ext.draft import Eagle3Draft


@dataclass
class StepResult:
    loss: float
    step_losses: list[float]
    step_accuracies: list[float]
    tokens: int  # loss-masked positions of step 0

    @property
    def acceptance_estimate(self) -> float:
        """1 + sum over steps of the product of per-step accuracies: the chain acceptance length
        if each step's accuracy were its conditional acceptance rate."""
        total, run = 1.0, 1.0
        for acc in self.step_accuracies:
            run *= acc
            total += run
        return total


def warmup_cosine(warmup: int, total: int):
    """The learning-rate factor of step ``step``: linear warm-up, then cosine down to a tenth."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class DraftTrainer:
    """The draft, its optimiser and scheduler, and one training step on a teacher batch: the draft
    unrolled ``ttt_steps`` steps on its own hidden states, each step's loss against the teacher's
    top-k (``loss="topk_kl"``) or its argmax (``"hard_ce"``)."""

    def __init__(
        self,
        draft: Eagle3Draft,
        *,
        ttt_steps: int,
        lr: float,
        warmup_steps: int,
        total_steps: int,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        loss: str = "topk_kl",
        reference_ops: bool = False,
        ddp_group=None,
    ):
        self.draft = draft
        self.model = draft
        if ddp_group is not None:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(draft, process_group=ddp_group)
        self.ttt_steps, self.grad_clip, self.loss = ttt_steps, grad_clip, loss
        params = [p for p in draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(warmup_steps, total_steps))
        self.loss_fn = reference.draft_topk_kl if reference_ops else ops.draft_topk_kl
        self.draft_ids = draft.draft_to_target()

    def step(self, batch: dict[str, Tensor], deferred=contextlib.nullcontext) -> StepResult:
        """One optimiser step; the update itself runs in ``deferred()`` (a signal then waits for it,
        so an interrupted run never saves a half-updated draft)."""
        steps = self.ttt_steps
        ids, mask, features = batch["input_ids"], batch["loss_mask"], batch["features"]
        b, t = ids.shape
        k = batch["teacher_indices"].shape[-1]
        # Step s at index t predicts token t + 2 + s (teacher row t + 1 + s): pad the time axis by
        # `steps` so every step reads a [B, T] window; padded rows never count.
        pad = lambda x, value: torch.cat([x, x.new_full((b, steps + 1) + tuple(x.shape[2:]), value)], 1)
        ids_ext, mask_ext = pad(ids, 0), pad(mask, False)
        t_idx, t_lp, t_arg = (
            pad(batch["teacher_indices"], -1),
            pad(batch["teacher_logprobs"], 0.0),
            pad(batch["teacher_argmax"], -1),
        )
        hiddens = self.model(features.to(self.draft.fc.weight.dtype), ids_ext, steps)
        weight = self.draft.lm_head.weight
        losses, accuracies, tokens = [], [], 0
        for s, hidden in enumerate(hiddens):
            rows = mask_ext[:, 2 + s : 2 + s + t].reshape(-1).nonzero().squeeze(1)
            idx = t_idx[:, 1 + s : 1 + s + t].reshape(-1, k).index_select(0, rows)
            lp = t_lp[:, 1 + s : 1 + s + t].reshape(-1, k).index_select(0, rows)
            if self.loss == "hard_ce":  # the teacher's argmax only, as a one-hot target
                idx, lp = idx[:, :1], torch.zeros_like(lp[:, :1])
            h = hidden.reshape(b * t, -1).index_select(0, rows)
            loss, argmax, _ = self.loss_fn(h, weight, idx, lp)
            want = t_arg[:, 1 + s : 1 + s + t].reshape(-1).index_select(0, rows)
            accuracies.append((self.draft_ids[argmax] == want).float().mean().item() if len(rows) else 0.0)
            losses.append(loss)
            if s == 0:
                tokens = len(rows)
        total = torch.stack(losses).mean()
        if not torch.isfinite(total):
            raise FloatingPointError("loss is not finite")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.draft.parameters(), self.grad_clip)
        with deferred():
            self.optimizer.step()
            self.scheduler.step()
        return StepResult(total.item(), [x.item() for x in losses], accuracies, tokens)
