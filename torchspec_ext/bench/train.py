"""Training throughput: the training loop's step with the custom ops against ``--reference-ops``.

Both modes run the same batches of the default target and data (or ``--target``/``--data``)
through the teacher (``linear_topk_logprobs`` vs the materialised logits and ``torch.topk``) and
the draft trainer (``draft_topk_kl`` vs eager log-softmax over the draft vocabulary, the TTT
unroll and the optimiser step being the same code), from the same initial draft. Tokens/s counts
every position of the batches; the target is ours / reference >= 1.3x on CPU.
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--target-dtype", default="float32", choices=["float32", "bfloat16"])


def run(args) -> Report:
    from torchspec_ext.train import parse_args
    from torchspec_ext.training.run import build_run

    device = resolve_device(args.device)
    steps = 2 if args.quick else args.steps
    max_length = args.max_length or (128 if args.quick else 512)
    argv = ["--device", device.type, "--batch-size", str(args.batch_size), "--max-length", str(max_length)]
    argv += ["--target-dtype", args.target_dtype, "--max-steps", str(steps + 1)]
    if args.target:
        argv += ["--target", args.target]
    if args.data:
        argv += ["--data", args.data]
    base = parse_args(argv)
    # Quick runs are too short to judge: no target there.
    goals = (
        []
        if args.quick
        else [Goal(f"tokens/s ≥ {TARGET_SPEEDUP}x reference-ops", lambda row: row["speedup"] < TARGET_SPEEDUP)]
    )
    report = Report(
        "train",
        {},
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
        # The same run assembled twice (same seed: the same draft and batches), with either kernels.
        run = build_run(dataclasses.replace(base, reference_ops=mode == "reference-ops", epochs=1))
        teacher_s = draft_s = 0.0
        tokens = 0
        for i in range(steps + 1):
            start = time.perf_counter()
            batch = run.online.batch(i)
            middle = time.perf_counter()
            run.trainer.step(batch)
            end = time.perf_counter()
            if i > 0:  # the first step warms up
                teacher_s += middle - start
                draft_s += end - middle
                tokens += batch.input_ids.numel()
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
    report.header = environment_header(
        device, f"{steps} steps after 1 warm-up, time.perf_counter, same batches in both modes"
    ) | {
        "case": f"default loop step: batch {base.batch_size} x up to {base.max_length} tokens, "
        f"top-{base.topk}, {run.family.title} draft, {dataclasses.asdict(base.family_options)}",
    }
    return report
