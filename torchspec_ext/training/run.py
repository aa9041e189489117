"""A training run assembled once (:func:`build_run`): the target and data, the draft (new, or from the
checkpoint resumed), the teacher and the stream of batches, the plan, the trainer and the held-out
check. ``train`` runs it; ``bench train`` and the tests build runs the same way."""

from __future__ import annotations

import contextlib
import copy
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from torchspec_ext import sharding
from torchspec_ext.data import load_conversations, short_prompts, split_held_out, tokenize_conversation
from torchspec_ext.drafts.base import DraftFamily, DraftLoadError, training_metadata
from torchspec_ext.options import DTYPES
from torchspec_ext.target import stop_token_ids
from torchspec_ext.teacher import Teacher
from torchspec_ext.training import budget, cache
from torchspec_ext.training.batches import Batches, prepare_tokenizer
from torchspec_ext.training.budget import BudgetKeeper, Plan
from torchspec_ext.training.checkpoints import find_checkpoint, read_state, restore_rng
from torchspec_ext.training.config import TrainConfig
from torchspec_ext.training.errors import TrainError
from torchspec_ext.training.evaluation import HeldOutCheck
from torchspec_ext.training.losses import kernels, loss_function
from torchspec_ext.training.roles import RankRoles, join_job, open_router, tensor_digest
from torchspec_ext.training.streams import RoutedStream, TeacherStream, pass_length, replayed_passes
from torchspec_ext.training.trainer import DraftTrainer


@dataclass
class Run:
    """Everything a rank of a run holds. A teacher rank has no trainer nor held-out check; only the
    lead trainer has a held-out check."""

    config: TrainConfig
    roles: RankRoles
    device: str
    started: float  # time.monotonic() at the start
    output_dir: Path
    family: DraftFamily
    target: object
    target_dtype: str
    draft: torch.nn.Module
    online: TeacherStream
    stream: object  # a BatchStream
    plan: Plan
    keeper: BudgetKeeper | None  # --time-budget
    trainer: DraftTrainer | None
    heldout: HeldOutCheck | NoHeldOutCheck | None
    start_step: int
    resumed_from: Path | None
    sharded: dict  # a teacher rank holding a shard of the target: what it holds and read


def build_run(config: TrainConfig) -> Run:
    started = time.monotonic()
    if config.on_gpu and not torch.cuda.is_available():
        raise TrainError(
            f"--device {config.device}: no CUDA GPU is usable here (torch.cuda.is_available() is False: "
            "no GPU, no driver, or a CPU-only torch); use --device cpu"
        )
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    roles, device = join_job(config.teacher_ranks, config.device, config.dist_timeout, config.teacher_shards)
    # In a job whose teachers shard the target (too large for one device) no rank reads it whole: every
    # rank builds it without weights, the trainers read its embedding and LM head for the draft, and
    # each teacher reads its shard after the draft is made (shard_teacher).
    target, tokenizer, train_set, held_out = load_target_and_data(config, device, roles)
    batches = Batches(train_set, tokenizer, config.batch_size, config.max_length, config.seed)
    target, target_dtype = choose_target_dtype(target, target_dtype_name(config), batches, roles.distributed)
    checkpoint = find_checkpoint(Path(config.output_dir), config.resume) if config.resume else None
    resumed = read_state(checkpoint) if checkpoint is not None else None  # read once: it holds the optimiser
    family = config.family
    # A shard teacher uses only the draft's vocabulary maps and feature layers: its weights stay on meta.
    holds_shard = roles.shard_group is not None
    with sharding.weightless() if holds_shard else contextlib.nullcontext():
        draft = (
            load_checkpoint_draft(family, checkpoint, None if holds_shard else target)
            if checkpoint
            else new_draft(family, target, batches, config)
        )
    draft = draft if holds_shard else draft.to(device)
    draft.metadata = training_metadata(tokenizer, config.target, target_dtype, config.loss, config.responses)
    roles.same_everywhere(
        "draft vocabulary (every rank must read the same data, target, options and checkpoint)",
        tensor_digest([draft.draft_to_target()])[0],
    )
    sharded = shard_teacher(roles, target, device, config)
    ops_module = kernels(config.reference_ops)
    teacher = Teacher(target, draft.feature_layers, draft.target_to_draft(), config.teacher_topk, ops_module)
    eos = stop_token_ids(target, tokenizer)
    online = TeacherStream(batches, teacher, config.responses, eos)
    prompts = held_out_prompts(config.eval_set, held_out, tokenizer, config.eval_prompts, config.seed)
    if config.teacher_shards > 1:
        heldout = NoHeldOutCheck(prompts)
        if roles.is_lead_trainer:
            print(f"[train] {NoHeldOutCheck.WHY}", file=sys.stderr)
    else:
        heldout = HeldOutCheck(
            target, family, prompts, config.eval_new_tokens, config.eval_depth, config.eval_tree_topk,
            config.eval_tree_nodes, eos,
        )  # fmt: skip
    loss = loss_function(config.loss, ops_module)
    make_trainer = lambda model, group=None: DraftTrainer(
        model, config.family_options, loss=loss, lr=config.lr, warmup_steps=config.warmup_steps,
        total_steps=config.max_steps, weight_decay=config.weight_decay, grad_clip=config.grad_clip, ddp_group=group,
    )  # fmt: skip
    plan, keeper = make_plan(config, roles, resumed, started, online, draft, heldout, make_trainer)
    stream = open_stream(config, roles, draft, online, plan, target_dtype, device, resumed)
    run = Run(
        config, roles, device, started, Path(config.output_dir), family, target, target_dtype, draft, online, stream,
        plan, keeper, None, None, resumed["step"] if resumed else 0, checkpoint, sharded,
    )  # fmt: skip
    if roles.is_teacher:
        return run
    run.trainer = make_trainer(draft, roles.trainer_group if len(roles.trainers) > 1 else None)
    run.trainer.total_steps = plan.steps
    if resumed is not None:
        run.trainer.load_state_dict(resumed["trainer"])
        restore_rng(resumed["rng"])
        print(
            f"[train] resumed from {checkpoint} at step {run.start_step}, on its plan of {plan.steps} steps "
            "(a resumed run keeps its checkpoint's step count and schedule, whatever --max-steps says)",
            file=sys.stderr,
        )
    run.heldout = heldout if roles.is_lead_trainer else None
    return run


def load_target_and_data(config: TrainConfig, device: str, roles: RankRoles | None = None):
    """(target, tokenizer, train conversations, held-out conversations), with clear errors. The target
    is on ``device`` in float32 or the dtype asked for; in a job with --teacher-shards it is built
    without weights (on the meta device) and only a trainer reads its embedding and LM head, in the
    dtype :func:`target_dtype_name` gives (the teachers read their shards in :func:`shard_teacher`)."""
    from torchspec_ext.target import load_target, load_unread_target

    try:
        if config.teacher_shards > 1:
            trainer = roles is not None and not roles.is_teacher
            target, tokenizer = load_unread_target(config.target, DTYPES[target_dtype_name(config)], trainer)
        else:
            dtype = DTYPES["float32" if config.target_dtype == "auto" else config.target_dtype]
            target, tokenizer = load_target(config.target, dtype, device)
    except (FileNotFoundError, ModuleNotFoundError, ImportError, OSError, ValueError) as exc:
        raise TrainError(f"cannot load the target: {exc}") from exc
    prepare_tokenizer(tokenizer, config.chat_template)
    context = getattr(target.config, "max_position_embeddings", None)
    if context is not None and config.max_length > context:
        raise TrainError(
            f"--max-length {config.max_length} is longer than the target's context ({context} tokens): "
            f"pass --max-length {context} or less"
        )
    try:
        conversations, report = load_conversations(config.data)
    except FileNotFoundError as exc:
        raise TrainError(f"cannot read the data: {exc}") from exc
    except ValueError as exc:
        raise TrainError(str(exc)) from exc
    print(f"[train] data: {report.summary()}", file=sys.stderr)
    if len(conversations) < 2:
        raise TrainError(
            f"{report.path}: {len(conversations)} usable conversation(s); training needs at least 2 "
            "(one is held out for evaluation)"
        )
    train_set, held_out = split_held_out(conversations, config.held_out, seed=config.seed)
    return target, tokenizer, train_set, held_out


def held_out_prompts(eval_set: str, held_out, tokenizer, count: int, seed: int) -> list[list[int]]:
    """The held-out check's prompts (first turns, up to 256 tokens): the data's held-out
    conversations, or ``count`` of a prompt set (torchspec_ext.evalsets)."""
    if eval_set == "held-out":
        return short_prompts(held_out, tokenizer, count, max_prompt_tokens=256)
    from torchspec_ext.evalsets import PromptSetError, load_prompt_set, turn_prompt

    try:
        chosen = load_prompt_set(eval_set, tokenizer, limit=count, max_prompt_tokens=256, seed=seed)
    except PromptSetError as exc:
        raise TrainError(f"--eval-set: {exc}") from None
    return [turn_prompt(tokenizer, item) for item in chosen.items]


def target_dtype_name(config: TrainConfig) -> str:
    """--target-dtype, or for a sharded target (read in its dtype, so chosen before reading) 'auto'
    resolved as :func:`choose_target_dtype` resolves it under torchrun."""
    if config.teacher_shards > 1 and config.target_dtype == "auto":
        return "bfloat16" if config.on_gpu else "float32"
    return config.target_dtype


def choose_target_dtype(target, name: str, batches: Batches, distributed: bool) -> tuple[object, str]:
    """(target, its dtype's name): as asked, or for 'auto' the faster of float32 and bfloat16 for the
    target's forward over the first token batch, timed here (in a torchrun job, where every rank must
    agree without measuring: bfloat16 on a GPU, float32 on a CPU)."""
    if name != "auto":
        return target, name
    on_gpu = next(target.parameters()).device.type == "cuda"
    if distributed:
        chosen = "bfloat16" if on_gpu else "float32"
        return target.to(DTYPES[chosen]), chosen
    _, ids, _ = batches.tokens(0)
    ids = ids.to(next(target.parameters()).device)
    timed = {}
    for dtype in ("float32", "bfloat16"):
        model = target if dtype == "float32" else copy.deepcopy(target).to(torch.bfloat16)
        try:
            with torch.no_grad():
                model.model(ids)  # a warm-up: the first call pays one-time costs
                begin = time.perf_counter()
                model.model(ids, output_hidden_states=True)
                timed[dtype] = time.perf_counter() - begin
        except RuntimeError as exc:  # a dtype this machine cannot run
            print(f"[train] the target does not run in {dtype} here: {exc}", file=sys.stderr)
        if dtype == "bfloat16" and dtype in timed and timed[dtype] < timed.get("float32", float("inf")):
            target = model
    chosen = min(timed, key=timed.get)
    shown = ", ".join(f"{k} {v:.2f} s" for k, v in timed.items())
    print(f"[train] --target-dtype auto: a teacher forward takes {shown}: {chosen}", file=sys.stderr)
    return target, chosen


def new_draft(family: DraftFamily, target, batches: Batches, config: TrainConfig):
    options = config.family_options
    sample_size = getattr(options, "vocab_sample", 0)
    sample = [
        tokenize_conversation(batches.tokenizer, c, config.max_length) for c in batches.conversations[:sample_size]
    ]
    try:
        return family.new_draft(target, sample, options)
    except ValueError as exc:
        raise TrainError(str(exc)) from None


def load_checkpoint_draft(family: DraftFamily, checkpoint: Path, target):
    try:
        return family.load(checkpoint, target)
    except DraftLoadError as exc:
        raise TrainError(f"--resume: {exc}") from None


def shard_teacher(roles: RankRoles, target, device: str, config: TrainConfig) -> dict:
    """In a job with --teacher-shards: a teacher rank reads its shard of ``target`` (built without
    weights) from the checkpoint's files, its group reading together; a trainer lets go of the
    embedding and LM head it read for the draft. Returns what a teacher holds and read, for the summary."""
    if config.teacher_shards == 1:
        return {}
    if roles.shard_group is None:
        target.to("meta")
        return {}
    from torchspec_ext.target import default_target_dir, weight_files

    try:
        files = weight_files(Path(config.target) if config.target else default_target_dir())
        read = sharding.load_sharded_target(target, files, roles.shard_group, torch.device(device))
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load the target: {exc}") from exc
    held, whole = sharding.weight_bytes(target)
    mib = lambda b: "?" if b is None else f"{b / 2**20:.0f}"
    print(
        f"[train] rank {roles.rank}: holds {held / 2**20:.2f} MiB of the target's {whole / 2**20:.2f} MiB of "
        f"weights, sharded over ranks {', '.join(map(str, roles.shard_ranks))}; read {read['read_bytes'] / 2**20:.2f} "
        f"MiB of its files in {read['load_s']:.1f} s (RSS {mib(read['rss_before_bytes'])} MiB before, peak "
        f"{mib(read['peak_rss_bytes'])} MiB after)",
        file=sys.stderr,
    )
    return {
        "weights_held_mib": held / 2**20,
        "weights_mib": whole / 2**20,
        "read_mib": read["read_bytes"] / 2**20,
        "load_s": read["load_s"],
        "rss_before_load_mib": read["rss_before_bytes"] and read["rss_before_bytes"] / 2**20,
        "load_peak_rss_mib": read["peak_rss_bytes"] / 2**20,
    }


class NoHeldOutCheck:
    """The held-out check of a job whose teachers shard the target: the trainers hold no copy of it
    (a target sharded because it fits no device would not fit a trainer either), so it measures
    nothing and says so; the draft is evaluated with ``eval`` where the target fits or is served."""

    WHY = (
        "--teacher-shards: the trainers hold no copy of the target, so this run measures no held-out acceptance "
        "length (the metrics carry none); evaluate the draft it writes with `python -m torchspec_ext.eval` where "
        "the target fits, or in SGLang / vLLM, which serve it sharded"
    )
    modes: dict = {}

    def __init__(self, prompts):
        self.prompts = prompts

    def __call__(self, draft) -> dict[str, float]:
        return {}

    def describe(self, found: dict[str, float]) -> str:
        return "not measured (--teacher-shards: the trainers hold no target)"


def make_plan(config: TrainConfig, roles, resumed, started, online, draft, heldout, make_trainer):
    """(plan, budget keeper or None): a resumed run's own plan; --time-budget's, from costs measured
    here; else --max-steps over --epochs passes."""
    needed = lambda steps: pass_length(steps * len(roles.trainers), config.epochs, len(online.batches))
    if resumed is not None:
        plan = Plan.from_state(resumed["plan"])
    elif config.time_budget is None:
        plan = Plan(config.max_steps, needed(config.max_steps))
    else:
        plan = None
    if config.time_budget is None:
        return plan, None
    minutes = config.time_budget
    decoded = config.eval_new_tokens * config.eval_prompts * len(heldout.modes)
    prompt = heldout.prompts[0]
    if plan is not None:
        print(f"[train] --time-budget: resuming the checkpoint's plan: {plan.steps} steps", file=sys.stderr)
        evaluation = budget.evaluation_seconds(online.teacher.target, prompt, decoded)
    else:
        costs, ready = budget.measure_costs(
            started, online, lambda: make_trainer(copy.deepcopy(draft)), online.teacher.target, prompt, decoded,
            config.eval_interval,
        )  # fmt: skip
        try:
            plan = budget.plan_run(minutes * 60, costs, config.epochs, online.round_batches, ready, len(online.batches))
        except budget.BudgetError as exc:
            raise TrainError(f"--time-budget {minutes:g}: {exc}") from None
        print(f"[train] --time-budget {minutes:g}: {plan.describe(costs, minutes * 60)}", file=sys.stderr)
        evaluation = costs.evaluation
    replays = config.epochs > 1
    keeper = BudgetKeeper(plan, started + 60 * minutes, evaluation, replays, len(online.batches), resumed_step(resumed))
    return plan, keeper


def resumed_step(resumed) -> int:
    return resumed["step"] if resumed else 0


def open_stream(config: TrainConfig, roles, draft, online: TeacherStream, plan: Plan, target_dtype, device, resumed):
    """This rank's batches: from the teacher ranks (a trainer rank under torchrun), from the
    ``--cache-teacher`` cache, or online through the target (kept for replay when ``--epochs``
    is above 1)."""
    cached = None
    if config.cache_teacher:  # every rank checks the cache, so that all stop alike when it is wrong
        from torchspec_ext.target import default_target_dir

        target_dir = Path(config.target) if config.target else default_target_dir()
        identity = cache.cache_identity(
            target_dir, target_dtype, config.teacher_topk, draft.feature_layers, draft.draft_to_target()
        )
        cached = cache.open_cache(
            Path(config.cache_teacher), identity, online, plan.teacher_batches, config.seed, device,
            may_write=not roles.distributed,
        )  # fmt: skip
    if roles.distributed and not roles.is_teacher:
        return RoutedStream(open_router(roles, config.dist_timeout, device), len(roles.trainers), resumed_step(resumed))
    if cached is not None:
        return cached
    if config.epochs > 1:
        print(
            f"[train] --epochs {config.epochs}: {plan.teacher_batches} teacher batches, each run through the target "
            "once and kept in CPU memory for the later passes",
            file=sys.stderr,
        )
        return replayed_passes(online, plan.teacher_batches, config.seed)
    return online
