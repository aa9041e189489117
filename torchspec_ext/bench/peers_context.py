"""What every run of ``bench peers-train`` for one seed shares: the options with their quick and full
defaults (:class:`Settings`), and our run's target, token batches (its data split and batch order)
and the validation prompts, held out of every run's training (:class:`Context`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SETS = ("mt-bench", "humaneval", "sharegpt")
MODES = ("chain", "tree")
OUR_LOSSES = ("topk_kl", "hard_ce", "lk-alpha", "lk-lambda")
SPECFORGE_KL = "specforge-kl"  # the losses mode's name for SpecForge's recipe (its full-vocabulary KL)
VALIDATION_RESERVE = 64  # at most: the batches at the end of the first epoch's order, which no run trains on


@dataclass
class Settings:
    """The options with the quick / full defaults filled in."""

    max_length: int
    minutes: float
    specforge_lrs: list[float] | None  # None: SpecForge's default, then the full sweep
    throughput_batches: int
    steps: int
    limit: int
    max_new_tokens: int
    validation_prompts: int

    @staticmethod
    def of(args) -> Settings:
        quick = args.quick
        pick = lambda value, full, small: value if value is not None else (small if quick else full)
        return Settings(
            max_length=pick(args.max_length, 512, 128),
            minutes=pick(args.minutes, 14.0, 0.5),
            specforge_lrs=args.specforge_lrs,
            throughput_batches=pick(args.throughput_batches, 3, 1),
            steps=pick(args.steps, 120, 2),
            limit=pick(args.limit, 16, 1),
            max_new_tokens=pick(args.max_new_tokens, 64, 16),
            validation_prompts=pick(args.validation_prompts, 8, 1),
        )


@dataclass
class Context:
    """What every recipe of one seed shares: our run's target, tokenizer and token batches (its
    split and order), the validation prompts, and a working folder."""

    args: Any
    settings: Settings
    seed: int
    run: Any  # torchspec_ext.training.run.Run, built once: target, data, our draft and teacher
    workdir: Path
    validation: list[list[int]] = field(default_factory=list)

    @property
    def target(self):
        return self.run.target

    @property
    def batches(self):
        return self.run.online.batches

    @property
    def available(self) -> int:
        """Teacher batches a run may use (those after it are the validation prompts' conversations)."""
        return len(self.batches) - reserved_batches(len(self.batches))

    @property
    def specforge_dtype(self) -> str:
        """The dtype SpecForge's recipes train in: ``--specforge-dtype``, else its bfloat16 where the CPU
        multiplies it natively and float32 elsewhere (:func:`~torchspec_ext.bench.specforge_recipes.default_dtype`)."""
        from torchspec_ext.bench.specforge_recipes import default_dtype

        return self.args.specforge_dtype or default_dtype()

    def tokens(self, j: int) -> int:
        return self.batches.tokens(j)[1].numel()


def make_context(args, settings: Settings, seed: int) -> Context:
    from torchspec_ext.data import short_prompts
    from torchspec_ext.train import parse_args
    from torchspec_ext.training.run import build_run

    argv = ["--device", "cpu", "--batch-size", str(args.batch_size), "--max-length", str(settings.max_length)]
    argv += ["--target-dtype", args.target_dtype, "--epochs", "1", "--max-steps", "1", "--seed", str(seed)]
    argv += ["--draft-family", args.family]
    argv += ["--draft-layers", str(args.draft_layers)] * (args.draft_layers is not None)
    argv += ["--target", args.target] * bool(args.target) + ["--data", args.data] * bool(args.data)
    argv += ["--lr", str(args.lr)] * (args.lr is not None)
    run = build_run(parse_args(argv))
    batches = run.online.batches
    if len(batches) < 2:
        raise SystemExit(f"bench peers-train: the data makes {len(batches)} batch(es); it needs at least 2")
    first = len(batches) - reserved_batches(len(batches))
    reserved = [c for j in range(first, len(batches)) for c in batches.conversations_of(j)]
    validation = short_prompts(reserved, batches.tokenizer, settings.validation_prompts, max_prompt_tokens=256)
    workdir = Path(args.out) / f"seed-{seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    return Context(args, settings, seed, run, workdir, validation)


def reserved_batches(count: int) -> int:
    """Of ``count`` batches a pass, how many at the end of the first pass's order are kept for validation."""
    return max(1, min(VALIDATION_RESERVE, count // 2))


def slug(name: str) -> str:
    """A folder name for a run's draft."""
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in name).strip("-")
