"""Training throughput: the training loop's step with the custom ops against ``--reference-ops``.

Both modes run the same batches of the default target and data (or ``--target``/``--data``)
through the teacher (``linear_topk_logprobs`` vs the materialised logits and ``torch.topk``) and
the draft trainer (``draft_topk_kl`` vs eager log-softmax over the draft vocabulary, the TTT
unroll and the optimiser step being the same code), from the same initial draft. Tokens/s counts
every position of the batches; the target is ours / reference >= 1.3x on CPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

from torchspec_ext.bench.common import Goal, resolve_device, verdict
from torchspec_ext.bench.common import target as target_cell
from torchspec_ext.bench.report import TARGET_COLUMNS, Column, Report, environment_header, fmt_fixed, fmt_num

TARGET_SPEEDUP = 1.3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode (after one warm-up step)")
    parser.add_argument("--target", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per conversation (default 512; quick: 128)"
    )


def run(args) -> Report:
    from torchspec_ext import train

    device = resolve_device(args.device)
    steps = 2 if args.quick else args.steps
    max_length = args.max_length or (128 if args.quick else 512)
    argv = ["--device", device.type, "--batch-size", str(args.batch_size), "--max-length", str(max_length)]
    if args.target:
        argv += ["--target", args.target]
    if args.data:
        argv += ["--data", args.data]
    base = train.parse_args(argv)
    target, tokenizer, train_set, _ = train.load_target_and_data(base, base.device)
    batches = train.Batches(train_set, tokenizer, base.batch_size, base.max_length, base.seed)
    draft0 = train.make_draft(target, tokenizer, train_set, base.draft_vocab, base.vocab_sample, base.max_length)
    draft0 = draft0.to(base.device)
    token_batches = [batches.next() for _ in range(steps + 1)]
    # Quick runs are too short to judge: no target there.
    goals = (
        []
        if args.quick
        else [Goal(f"tokens/s ≥ {TARGET_SPEEDUP}x reference-ops", lambda row: row["speedup"] < TARGET_SPEEDUP)]
    )
    header = environment_header(
        device, f"{steps} steps after 1 warm-up, time.perf_counter, same batches in both modes"
    ) | {
        "case": f"default loop step: batch {base.batch_size} x up to {base.max_length} tokens, "
        f"top-{base.topk}, draft vocab {draft0.config.draft_vocab_size}, TTT {base.ttt_steps}",
    }
    report = Report(
        "train",
        header,
        [
            Column("mode", "mode"),
            Column("teacher_ms", "teacher ms/step", fmt_num()),
            Column("draft_ms", "draft ms/step", fmt_num()),
            Column("tokens_per_s", "tokens/s", fmt_num()),
            Column("speedup", "speed-up", fmt_fixed(2, "x")),
            *TARGET_COLUMNS,
        ],
    )
    results = {}
    for mode in ("reference-ops", "ours"):
        config = dataclasses.replace(base, reference_ops=mode == "reference-ops")
        draft = copy.deepcopy(draft0)
        teacher = train.Teacher(
            target, draft.config.feature_layers, draft.target_to_draft(), base.topk, config.reference_ops
        )
        trainer = train.make_trainer(draft, config)
        teacher_s = draft_s = 0.0
        tokens = 0
        for i, (index, ids, mask) in enumerate(token_batches):
            start = time.perf_counter()
            batch = teacher(ids, mask, index)
            middle = time.perf_counter()
            trainer.step(batch)
            end = time.perf_counter()
            if i > 0:  # the first step warms up
                teacher_s += middle - start
                draft_s += end - middle
                tokens += ids.numel()
        results[mode] = tokens / (teacher_s + draft_s)
        row = {
            "mode": mode,
            "teacher_ms": 1e3 * teacher_s / steps,
            "draft_ms": 1e3 * draft_s / steps,
            "tokens_per_s": results[mode],
        }
        if mode == "ours":
            row["speedup"] = results["ours"] / results["reference-ops"]
            row["target"], row["result"] = target_cell(goals), verdict(goals, row)
        report.rows.append(row)
    return report
