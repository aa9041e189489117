"""The recipes ``bench peers-train`` trains: ours (``python -m torchspec_ext.train``'s) and SpecForge's
(:mod:`torchspec_ext.bench.specforge_recipes`) of the run's draft family (EAGLE-3 or DFlash), behind one
interface. A recipe has ``make_batch(j)`` (teacher batch ``j``, running the target) and ``trainer(steps,
lr)`` (a fresh draft whose trainer has ``step(batch)`` and ``export(folder)``, the folder in our layout)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Protocol

from torchspec_ext.bench.peers_context import SPECFORGE_KL, Context


class Trainer(Protocol):
    def step(self, batch) -> float: ...

    def export(self, directory: Path) -> Path: ...


class Recipe(Protocol):
    name: str

    def make_batch(self, j: int) -> Any: ...

    def trainer(self, total_steps: int, lr: float | None = None) -> Trainer: ...


class Ours:
    """``python -m torchspec_ext.train``'s recipe: its draft (initialised from the target), teacher
    (top-k of the target's distribution by ``linear_topk_logprobs``) and trainer (its optimiser,
    schedule and loss), as ``build_run`` assembles them."""

    def __init__(self, context: Context, loss: str = "topk_kl"):
        self.context, self.loss = context, loss
        self.name = "ours" if loss == "topk_kl" else f"ours ({loss})"
        self.initial = copy.deepcopy(context.run.draft)  # before any step trains it
        self.default_lr = context.run.config.lr

    def make_batch(self, j: int):
        return self.context.run.online.batch(j)

    def trainer(self, total_steps: int, lr: float | None = None) -> OursTrainer:
        from torchspec_ext.training.losses import kernels, loss_function
        from torchspec_ext.training.trainer import DraftTrainer

        config = self.context.run.config
        draft = copy.deepcopy(self.initial)
        draft.metadata = dict(draft.metadata, loss=self.loss)
        trainer = DraftTrainer(
            draft, config.family_options, loss=loss_function(self.loss, kernels(config.reference_ops)),
            lr=self.default_lr if lr is None else lr, warmup_steps=config.warmup_steps, total_steps=total_steps,
            weight_decay=config.weight_decay, grad_clip=config.grad_clip,
        )  # fmt: skip
        return OursTrainer(trainer)

    def describe(self) -> dict:
        config = self.context.run.config
        described = {"lr": config.lr, "warmup_steps": config.warmup_steps, "topk": config.teacher_topk}
        return described | vars(config.family_options)


class OursTrainer:
    def __init__(self, trainer):
        self.trainer, self.lr = trainer, trainer.optimizer.defaults["lr"]

    def step(self, batch) -> float:
        return self.trainer.step(batch).loss

    def export(self, directory: Path) -> Path:
        self.trainer.draft.save(directory)
        return directory


class SpecForge:
    """SpecForge's recipe of the run's family (:mod:`~torchspec_ext.bench.specforge_recipes`:
    ``SpecForgeEagle3``, ``SpecForgeDFlash``) on the context's target and batches; exports convert its
    draft to our folder layout."""

    name = "specforge"

    def __init__(self, context: Context):
        from torchspec_ext.bench.specforge_recipes import SpecForgeDFlash, SpecForgeEagle3

        run = context.run
        batches = run.online.batches
        if run.config.draft_family == "dflash":
            self.recipe = SpecForgeDFlash(
                run.target, batches.tokenizer, batches, run.draft.config.mask_token_id,
                run.config.family_options.num_anchors, context.workdir, context.seed, context.specforge_dtype,
            )  # fmt: skip
        else:
            sample = run.config.family_options.vocab_sample
            self.recipe = SpecForgeEagle3(
                run.target, batches.tokenizer, batches, batches.conversations[:sample], context.workdir, context.seed,
                context.specforge_dtype,
            )  # fmt: skip
        self.context, self.default_lr = context, self.recipe.default_lr
        self.metadata = dict(run.draft.metadata, loss=SPECFORGE_KL, target_dtype=context.args.target_dtype)

    def make_batch(self, j: int):
        return self.recipe.make_batch(j)

    def trainer(self, total_steps: int, lr: float | None = None) -> Trainer:
        inner = self.recipe.trainer(total_steps, lr)
        metadata, layers = self.metadata, self.context.target.config.num_hidden_layers

        class Exporting:
            lr = inner.lr

            def step(self, batch) -> float:
                return inner.step(batch)

            def export(self, directory: Path) -> Path:
                return inner.export(directory, metadata, layers)

        return Exporting()

    def describe(self) -> dict:
        return self.recipe.describe()


# name -> recipe class (a recipe's constructor takes the Context); `--compare recipes` trains each.
RECIPES = {"ours": Ours, "specforge": SpecForge}
