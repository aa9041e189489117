"""``python -m torchspec_ext.train``: train an EAGLE-3 draft online against a target model.

With no arguments: the embedded default target (SmolLM2-135M-Instruct) and ShareGPT data, on the
CPU, in about 15 minutes on 2 cores; the draft lands in ``--output-dir``/draft as an EAGLE-3
checkpoint that SGLang and vLLM load. Each batch goes through the teacher (the target: three
hidden states and its top-k next-token log-probabilities), then the draft is unrolled for
``--ttt-steps`` steps on its own hidden states and trained with ``draft_topk_kl``.

Under ``torchrun --nproc-per-node N -m torchspec_ext.train --teacher-ranks n``, ranks ``0..n-1``
run the target and send their batches (torchspec_ext.pipeline) to the other ranks, which train the
draft data-parallel; the first trainer writes checkpoints, metrics and the draft (see ``training.roles``);
``--teacher-shards S`` makes the teacher ranks groups of S, each holding one target sharded over it.
``--epochs E`` runs the target over max-steps / E batches once and replays them E times (kept in
memory); ``--cache-teacher DIR`` stores them in DIR instead, for this run and later ones.

Every flag can also come from a JSON or TOML ``--config`` file (keys are the flag names with
underscores); flags given on the command line win.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
import traceback
from pathlib import Path

import torch

from torchspec_ext import sharding
from torchspec_ext.data import load_conversations, short_prompts, split_held_out, tokenize_conversation
from torchspec_ext.draft import DraftConfig, Eagle3Draft
from torchspec_ext.pipeline import ChannelError
from torchspec_ext.speculate import TreeSpec
from torchspec_ext.target import stop_token_ids
from torchspec_ext.teacher import Teacher, build_draft_vocab
from torchspec_ext.training import budget, cache
from torchspec_ext.training.batches import Batches, prepare_tokenizer
from torchspec_ext.training.checkpoints import (
    FINAL_DRAFT,
    find_checkpoint,
    restore,
    save_checkpoint,
    trainer_state,
)
from torchspec_ext.training.config import TARGET_DTYPES, TrainConfig
from torchspec_ext.training.config import parse_args as _parse_args
from torchspec_ext.training.errors import Interrupted, StopSignals, TrainError
from torchspec_ext.training.metrics import Metrics, Progress, step_values
from torchspec_ext.training.roles import RankRoles, finish_job, join_job, open_router, serve_batches, tensor_digest
from torchspec_ext.training.streams import RoutedStream, TeacherStream, pass_length, replayed_passes
from torchspec_ext.training.trainer import DraftTrainer


def parse_args(argv=None) -> TrainConfig:
    return _parse_args(argv, __doc__)


def load_target_and_data(config: TrainConfig, device: str):
    """(target on ``device``, tokenizer, train conversations, held-out conversations), with clear errors."""
    from torchspec_ext.target import load_target

    try:
        target, tokenizer = load_target(config.target, TARGET_DTYPES[config.target_dtype], device)
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


def make_draft(target, tokenizer, conversations, vocab_size: int, vocab_sample: int, max_length: int) -> Eagle3Draft:
    """A new draft for ``target`` whose vocabulary is the ``vocab_size`` target tokens most frequent
    in the replies of the first ``vocab_sample`` conversations, initialised from the target."""
    if vocab_size > target.config.vocab_size:
        raise TrainError(
            f"--draft-vocab {vocab_size} is larger than the target's vocabulary: give 1 to {target.config.vocab_size}"
        )
    sample = [tokenize_conversation(tokenizer, c, max_length) for c in conversations[:vocab_sample]]
    vocab = build_draft_vocab([ids for ids, _ in sample], [m for _, m in sample], vocab_size, target.config.vocab_size)
    draft = Eagle3Draft(DraftConfig.from_target(target.config, vocab_size))
    draft.set_vocab(vocab)
    draft.init_from_target(target)
    return draft


def make_trainer(draft: Eagle3Draft, config: TrainConfig, ddp_group=None) -> DraftTrainer:
    return DraftTrainer(
        draft,
        ttt_steps=config.ttt_steps,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        total_steps=config.max_steps,
        weight_decay=config.weight_decay,
        grad_clip=config.grad_clip,
        loss=config.loss,
        reference_ops=config.reference_ops,
        ddp_group=ddp_group,
    )


def eval_modes(config: TrainConfig) -> dict[str, TreeSpec]:
    """The held-out evaluation's decoders: a chain, and a tree when --eval-tree-topk > 1."""
    modes = {"chain": TreeSpec.chain(config.eval_depth)}
    if config.eval_tree_topk > 1:
        modes["tree"] = TreeSpec(config.eval_depth, config.eval_tree_topk, config.eval_tree_nodes)
    return modes


def evaluate_draft(
    target, draft: Eagle3Draft, prompts, new_tokens: int, modes: dict[str, TreeSpec], eos
) -> dict[str, float]:
    """``acceptance_length`` (the chain's, the number the targets speak of) and, with a tree,
    ``tree_acceptance_length``: greedy, on the held-out ``prompts``; on the target's device (a
    copy of the draft there when the target is elsewhere, as in a job with a sharded teacher)."""
    from torchspec_ext.eval import draft_acceptance_lengths

    device = next(target.parameters()).device
    if draft.fc.weight.device != device:
        draft = copy.deepcopy(draft).to(device)
    found = draft_acceptance_lengths(target, draft, prompts, new_tokens, modes, eos)
    return {"acceptance_length" if name == "chain" else f"{name}_acceptance_length": v for name, v in found.items()}


def describe_acceptance(found: dict[str, float], modes: dict[str, TreeSpec]) -> str:
    chain = modes["chain"]
    text = f"chain of {chain.depth} {found['acceptance_length']:.2f}"
    if "tree" in modes:
        tree = modes["tree"]
        text += (
            f", tree (depth {tree.depth}, top-{tree.topk}, {tree.max_nodes} nodes) "
            f"{found['tree_acceptance_length']:.2f}"
        )
    return text


def plan_to_budget(
    config: TrainConfig,
    resumed: dict | None,
    started: float,
    online: TeacherStream,
    draft: Eagle3Draft,
    target,
    prompt: list[int],
) -> float:
    """Sets ``config.max_steps`` (and so the teacher batches, max-steps / epochs) for --time-budget
    from measured costs (:func:`budget.measure_costs`); returns the time (``time.monotonic()``) by
    which the training loop must end. A resumed run (``resumed``: its checkpoint's trainer state)
    keeps the plan of the run it continues."""
    decoded_tokens = config.eval_new_tokens * config.eval_prompts * len(eval_modes(config))
    minutes = config.time_budget
    if resumed is not None:
        planned = resumed["args"]
        config.max_steps, config.epochs = planned["max_steps"], planned["epochs"]
        print(f"[train] --time-budget: resuming the checkpoint's plan: {config.max_steps} steps", file=sys.stderr)
        return started + 60 * minutes - budget.evaluation_seconds(target, prompt, decoded_tokens)
    costs, ready = budget.measure_costs(
        started,
        online,
        lambda: make_trainer(copy.deepcopy(draft), config),
        target,
        prompt,
        decoded_tokens,
        config.eval_interval,
    )
    try:
        plan = budget.plan_run(minutes * 60, costs, config.epochs, online.round_batches, ready, len(online.batches))
    except budget.BudgetError as exc:
        raise TrainError(f"--time-budget {minutes:g}: {exc}") from None
    config.max_steps = plan.steps
    print(f"[train] --time-budget {minutes:g}: {plan.describe(costs, minutes * 60)}", file=sys.stderr)
    return started + 60 * minutes - costs.evaluation


def open_stream(config: TrainConfig, roles: RankRoles, draft: Eagle3Draft, online: TeacherStream):
    """This rank's batches: from the teacher ranks (a trainer rank under torchrun), from the
    ``--cache-teacher`` cache, or online through the target (kept for replay when ``--epochs``
    is above 1)."""
    cached = None
    needed = config.max_steps * len(roles.trainers)
    count = pass_length(needed, config.epochs, len(online.batches))
    if config.cache_teacher:  # every rank checks the cache, so that all stop alike when it is wrong
        from torchspec_ext.target import default_target_dir

        target_dir = Path(config.target) if config.target else default_target_dir()
        identity = cache.cache_identity(
            target_dir, config.target_dtype, config.topk, draft.config.feature_layers, draft.draft_to_target()
        )
        cached = cache.open_cache(
            Path(config.cache_teacher),
            identity,
            online,
            count,
            config.seed,
            config.device,
            may_write=not roles.distributed,
        )
    if roles.distributed and not roles.is_teacher:
        return RoutedStream(open_router(roles, config.dist_timeout, config.device), len(roles.trainers))
    if cached is not None:
        return cached
    if config.epochs > 1:
        print(
            f"[train] --epochs {config.epochs}: {count} teacher batches, each run through the target once and "
            "kept in CPU memory for the later passes",
            file=sys.stderr,
        )
        return replayed_passes(online, count, config.seed)
    return online


def serve_as_teacher(roles: RankRoles, stream, step: int, position: int, config: TrainConfig) -> dict:
    """A teacher rank's whole job: its share of the batches of the steps after ``step`` (from data
    position ``position``), then the job's end."""
    router = open_router(roles, config.dist_timeout, config.device)
    try:
        summary = serve_batches(roles, stream, router, config.max_steps - step, position)
    except RuntimeError as exc:  # a collective of the shard group (gloo / NCCL) failed
        if not roles.shard_ranks or isinstance(exc, ChannelError):
            raise
        ranks = ", ".join(map(str, roles.shard_ranks))
        raise ChannelError(
            f"the group of ranks {ranks} holding the target failed: one of them died or stopped "
            f"({str(exc).splitlines()[0]})"
        ) from exc
    finish_job(roles, None)
    return summary


@contextlib.contextmanager
def subnormals_flushed():
    """Subnormal floats appear in the draft's training after some tens of steps and make each CPU
    step after them up to 1.6x slower; flushed to zero they cost nothing (this sets the CPU's flags)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # torch's default, for the rest of the caller's process


def train(config: TrainConfig) -> dict:
    with subnormals_flushed():
        return _train(config)


def _train(config: TrainConfig) -> dict:
    started = time.monotonic()
    if config.on_gpu and not torch.cuda.is_available():
        raise TrainError(
            f"--device {config.device}: no CUDA GPU is usable here (torch.cuda.is_available() is False: "
            "no GPU, no driver, or a CPU-only torch); use --device cpu"
        )
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    roles, config.device = join_job(config.teacher_ranks, config.device, config.dist_timeout, config.teacher_shards)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # In a job whose teachers shard the target (too large for one device) every rank reads it into CPU
    # memory: the teachers' sharding moves their shards to their devices, the trainers evaluate there.
    target, tokenizer, train_set, held_out = load_target_and_data(
        config, "cpu" if config.teacher_shards > 1 else config.device
    )
    batches = Batches(train_set, tokenizer, config.batch_size, config.max_length, config.seed)
    checkpoint = find_checkpoint(output_dir, config.resume) if config.resume else None
    resumed = trainer_state(checkpoint) if checkpoint is not None else None  # read once: it holds the optimiser
    if checkpoint is not None:
        draft = Eagle3Draft.load(checkpoint, target)
    else:
        draft = make_draft(
            target, tokenizer, batches.conversations, config.draft_vocab, config.vocab_sample, config.max_length
        )
    draft = draft.to(config.device)
    roles.same_everywhere(
        "draft vocabulary (every rank must read the same data, target, options and checkpoint)",
        tensor_digest([draft.draft_to_target()])[0],
    )
    shard_summary = {}
    if roles.shard_group is not None:  # after the draft copied what it needs from the whole target
        sharding.shard_target(target, roles.shard_group, torch.device(config.device))
        held, whole = sharding.weight_bytes(target)
        shard_summary = {"weights_held_mib": held / 2**20, "weights_mib": whole / 2**20}
        print(
            f"[train] rank {roles.rank}: holds {held / 2**20:.2f} MiB of the target's {whole / 2**20:.2f} MiB of "
            f"weights, sharded over ranks {', '.join(map(str, roles.shard_ranks))}",
            file=sys.stderr,
        )
    teacher = Teacher(target, draft.config.feature_layers, draft.target_to_draft(), config.topk, config.reference_ops)
    eos = stop_token_ids(target, tokenizer)
    online = TeacherStream(batches, teacher, config.responses, eos)
    prompts = short_prompts(held_out, tokenizer, config.eval_prompts, max_prompt_tokens=256)
    deadline = math.inf  # for the training loop
    if config.time_budget is not None:
        deadline = plan_to_budget(config, resumed, started, online, draft, target, prompts[0])
    stream = open_stream(config, roles, draft, online)
    if roles.is_teacher:
        step, position = (resumed["step"], resumed["data_position"]) if resumed else (0, 0)
        return serve_as_teacher(roles, stream, step, position, config) | shard_summary
    if not roles.is_lead_trainer:
        target = teacher = None  # only the lead trainer evaluates
    trainer = make_trainer(draft, config, ddp_group=roles.trainer_group if len(roles.trainers) > 1 else None)
    step = restore(resumed, trainer, stream) if resumed is not None else 0
    if checkpoint is not None:
        print(f"[train] resumed from {checkpoint} at step {step}", file=sys.stderr)
    modes = eval_modes(config)
    lead = roles.is_lead_trainer
    options = dataclasses.asdict(config)
    metrics = Metrics(output_dir, enabled=lead)
    progress = Progress(config.max_steps, step, config.log_interval)
    summary: dict = {"start_step": step}
    done_position = stream.position  # the data position after the last finished step
    logged_step = step  # the last step with a line in metrics.jsonl
    with StopSignals() as signals:
        try:
            while step < config.max_steps:
                batch = stream.next()
                index = int(batch["batch_index"])
                try:
                    result = trainer.step(batch, signals.deferred)
                except FloatingPointError:
                    raise TrainError(
                        f"the loss is not finite at step {step + 1} (batch {index} of the data stream, "
                        f"epoch {index // len(batches)}); stopped without saving it. The last checkpoint "
                        "is intact: resume with a lower --lr or inspect that batch"
                    ) from None
                step += 1
                done_position = stream.position
                if lead:
                    progress.update(step, result)
                values = {
                    **step_values(result),
                    "tokens_per_s": progress.tokens_per_s(),
                    "lr": trainer.scheduler.get_last_lr()[0],
                    "elapsed_s": time.monotonic() - started,
                }
                if lead and config.eval_interval and step % config.eval_interval == 0 and step < config.max_steps:
                    found = evaluate_draft(target, draft, prompts, config.eval_new_tokens, modes, eos)
                    values.update({f"eval_{k}": v for k, v in found.items()})
                    progress.end()
                    print(
                        f"[train] step {step}: held-out acceptance length {describe_acceptance(found, modes)}",
                        file=sys.stderr,
                    )
                if step % config.log_interval == 0 or step == config.max_steps or "eval_acceptance_length" in values:
                    metrics.log(step, values)
                    logged_step = step
                if lead and (step % config.save_interval == 0 or step == config.max_steps):
                    with signals.deferred():
                        save_checkpoint(output_dir, trainer, done_position, step, options, config.keep_checkpoints)
                summary["tokens_per_s"] = progress.tokens_per_s()
                if time.monotonic() > deadline:  # the costs measured for the plan were too low
                    progress.end()
                    print(
                        f"[train] --time-budget {config.time_budget:g}: out of time at step {step} of "
                        f"{config.max_steps}; ending here",
                        file=sys.stderr,
                    )
                    break
        except Interrupted as stop:
            progress.end()
            hint = f"continue with --resume --output-dir {output_dir}"
            if lead and step > 0:
                if step % config.log_interval == 0 and logged_step != step:  # stopped between the step and its line
                    metrics.log(step, {"loss": result.loss, "elapsed_s": time.monotonic() - started})
                with signals.deferred():
                    saved = save_checkpoint(output_dir, trainer, done_position, step, options, config.keep_checkpoints)
                print(f"\n[train] {stop.name} at step {step}: saved {saved}; {hint}", file=sys.stderr)
            else:
                print(f"\n[train] {stop.name} at step {step}: nothing to save; {hint}", file=sys.stderr)
            metrics.close()
            raise SystemExit(128 + stop.signum) from None
    progress.end()
    stream.close()
    summary["steps"] = step
    if lead:
        draft.save(output_dir / FINAL_DRAFT)
        found = evaluate_draft(target, draft, prompts, config.eval_new_tokens, modes, eos)
        summary.update({f"eval_{k}": v for k, v in found.items()})
        metrics.log(step, {f"final_eval_{k}": v for k, v in found.items()})
        print(
            f"[train] done: {step} steps in {(time.monotonic() - started) / 60:.1f} min; held-out acceptance "
            f"length, greedy, {len(prompts)} prompts: {describe_acceptance(found, modes)}; draft in "
            f"{output_dir / FINAL_DRAFT}",
            file=sys.stderr,
        )
    metrics.close()
    if roles.distributed:
        summary.update(rank=roles.rank, role="trainer", draft_sha256=finish_job(roles, draft.trained_state().values()))
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
