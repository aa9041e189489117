"""The tensor pipeline against raw ``torch.distributed`` send/recv of the same bytes, in the same run.

Two processes on this machine (loopback): a producer (teacher) and a consumer (trainer).

- bandwidth: one batch of ``size`` bytes (three hidden-state tensors and a few small ones, as a
  teacher sends) per message; ours = ``TensorChannel.send``/``recv`` (header, preamble and the
  copies of the small tensors included), raw = ``dist.isend``/``irecv`` of one buffer holding the
  same bytes (the batch's tensors back to back: a buffer never written would be sent from the
  kernel's shared zero page, which costs no memory reads, and flatter raw by 5-20% on a CPU). Both
  timed on the consumer from the first to the last of ``repeat`` messages after a warm-up,
  alternated in rounds, median of the rounds. Target: ours >= 90% of raw from 16 MB up.
- overlap: the producer's step (a matmul standing in for the teacher's forward) timed alone and
  with a 16 MiB batch sent through the channel after each step, in alternating blocks. Target: < 5% slower.
  The same for the consumer's step (the trainer's), each followed by a ``recv()``: no target, it
  shows whether batches arrive while the trainer computes. On a CPU
  the transfer itself needs the CPU (packing copy, gloo's TCP threads), so there the producer
  shares its cores with it (gloo's TCP threads; the channel copies only the small tensors); on
  GPUs packing is a device copy and NCCL moves the bytes.

CPU: gloo. CUDA with two GPUs or more: NCCL, one GPU per process. With one GPU, NCCL cannot put
two ranks on it, so only our one-rank self-send is measured, against a device-to-device copy of
the same bytes (the physical floor of a transfer that never leaves the GPU), and it says so.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from torchspec_ext.bench.common import Goal, MiB, resolve_device, target, verdict
from torchspec_ext.bench.report import (
    TARGET_COLUMNS,
    Column,
    Report,
    environment_header,
    fmt_fixed,
    fmt_num,
    fmt_percent,
)

MIN_BW_FRACTION, MIN_BW_SIZE = 0.90, 16 * MiB
MAX_SLOWDOWN = 0.05


def add_arguments(parser) -> None:
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(float(x) * MiB) for x in s.split(",")],
        help="batch sizes in MiB, comma-separated (default 1,4,16,64; quick: 1,16)",
    )


def overlap_size(sizes) -> int:
    """The overlap case's batch: 16 MiB (or the largest size below), one that the transport can
    carry within a step, so the measurement is overlap and not the transport's throughput limit."""
    return max([s for s in sizes if s <= 16 * MiB] or [min(sizes)])


def make_batch(nbytes: int, device) -> dict[str, torch.Tensor]:
    """A teacher-like batch of about ``nbytes``: hidden states [3, T, 1024] bf16 plus ids, mask, top-k."""
    tokens = max(1, nbytes // (3 * 1024 * 2 + 8 + 1 + 16 * 12 + 4))
    return {
        "input_ids": torch.randint(0, 50000, (tokens,), device=device),
        "loss_mask": torch.ones(tokens, dtype=torch.bool, device=device),
        "hidden_states": torch.randn(3, tokens, 1024, device=device).to(torch.bfloat16),
        "topk_logprobs": torch.randn(tokens, 16, device=device),
        "topk_indices": torch.randint(0, 50000, (tokens, 16), device=device),
        "lse": torch.randn(tokens, device=device),
    }


def batch_bytes(batch) -> int:
    return sum(t.numel() * t.element_size() for t in batch.values())


def _init(rank: int, world: int, store_path: str, backend: str) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)  # two processes share the cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        store=dist.FileStore(store_path, world),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bandwidth(rank: int, device, sizes, repeat: int, rounds: int, backend: str) -> list[dict]:
    import torch.distributed as dist

    from torchspec_ext.pipeline import TensorChannel

    rows = []
    with TensorChannel(1 - rank, backend=backend, device=device, depth=2, timeout=120) as ch:
        for size in sizes:
            batch = make_batch(size, device)
            nbytes = batch_bytes(batch)
            raw = torch.cat([t.reshape(-1).view(torch.uint8) for t in batch.values()])  # the same bytes
            times = {"ours": [], "raw": []}
            for _ in range(rounds):
                for kind in ("raw", "ours"):
                    dist.barrier()
                    for i in range(repeat + 1):  # the first message is the warm-up
                        if i == 1:
                            _sync(device)
                            t0 = time.perf_counter()
                        if kind == "ours":
                            ch.send(batch) if rank == 0 else ch.recv()
                        else:
                            op = dist.isend(raw, dst=1) if rank == 0 else dist.irecv(raw, src=0)
                            op.wait()
                    _sync(device)
                    if rank == 1:
                        times[kind].append(time.perf_counter() - t0)
            if rank == 1:
                ours_s, raw_s = statistics.median(times["ours"]), statistics.median(times["raw"])
                rows.append(
                    {
                        "size_mib": nbytes / MiB,
                        "ours_gbps": nbytes * repeat / ours_s / 1e9,
                        "raw_gbps": nbytes * repeat / raw_s / 1e9,
                    }
                )
        _read_end(ch, rank)
    return rows


def _read_end(ch, rank: int) -> None:
    """The consumer reads the end of the stream, which the producer's close() waits for."""
    from torchspec_ext.pipeline import ChannelClosed

    if rank == 1:
        try:
            ch.recv()
        except ChannelClosed:
            return
        raise RuntimeError("bench pipeline: a batch arrived after the last one")


def _overlap(rank: int, device, size: int, steps: int, rounds: int, backend: str, stepper: int) -> dict | None:
    """Rank ``stepper`` (0: the producer, 1: the consumer) times blocks of ``steps`` steps alone and
    each followed by its channel call (send, recv) while the other rank makes the opposite calls,
    alternated ``rounds`` times (all sends received before the next block); the slowdown is the
    median over rounds of each pair's ratio, so that the step's own drift between rounds cancels out."""
    import torch.distributed as dist

    from torchspec_ext.pipeline import TensorChannel

    a = torch.randn(768, 768, device=device)

    def step():
        x = a
        for _ in range(6):
            x = torch.tanh(x @ a) * 0.1
        _sync(device)
        return x

    def transfer():
        ch.send(batch) if rank == 0 else ch.recv()

    result = None
    with TensorChannel(1 - rank, backend=backend, device=device, depth=2, timeout=120) as ch:
        batch = make_batch(size, device)
        for _ in range(3):
            step()
        times = {"alone": [], "with": []}
        for _ in range(rounds):
            for kind in ("alone", "with"):
                dist.barrier()
                if rank == stepper:
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        step()
                        if kind == "with":
                            transfer()
                    times[kind].append((time.perf_counter() - t0) / steps)
                elif kind == "with":
                    for _ in range(steps):
                        transfer()
        if rank == stepper:
            ratios = [w / a for a, w in zip(times["alone"], times["with"])]
            result = {
                "size_mib": batch_bytes(batch) / MiB,
                "alone_ms": statistics.median(times["alone"]) * 1e3,
                "with_ms": statistics.median(times["with"]) * 1e3,
                "slowdown": statistics.median(ratios) - 1,
            }
        _read_end(ch, rank)
    return result


def _worker(rank, store_path, backend, sizes, repeat, rounds, steps, overlap_rounds, queue):
    try:
        _init(rank, 2, store_path, backend)
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        bw = _bandwidth(rank, device, sizes, repeat, rounds, backend)
        size = overlap_size(sizes)
        ov = [_overlap(rank, device, size, steps, overlap_rounds, backend, stepper) for stepper in (0, 1)]
        queue.put((rank, "ok", {"bandwidth": bw, "overlap": ov[rank]}))
    except BaseException as exc:  # noqa: BLE001
        import traceback

        queue.put((rank, "error", f"{exc}\n{traceback.format_exc()}"))
    finally:
        queue.close()
        queue.join_thread()  # deliver before the hard exit
        os._exit(0)  # no process-group teardown: the peer may have finished first


def _two_processes(backend: str, sizes, repeat: int, rounds: int, steps: int, overlap_rounds: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, store, backend, sizes, repeat, rounds, steps, overlap_rounds, queue))
            for r in range(2)
        ]
        for p in procs:
            p.start()
        results = {}
        try:
            for _ in range(2):
                rank, status, value = queue.get(timeout=900)
                if status != "ok":
                    raise SystemExit(f"bench pipeline: rank {rank} failed: {value}")
                results[rank] = value
        finally:
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
    return {
        "bandwidth": results[1]["bandwidth"],
        "overlap": results[0]["overlap"],
        "overlap_consumer": results[1]["overlap"],
    }


def _self_send(sizes, repeat: int) -> list[dict]:
    """One GPU: our channel sending to itself (one-rank NCCL communicator) vs a device copy."""
    import torch.distributed as dist

    from torchspec_ext.pipeline import TensorChannel

    device = torch.device("cuda", 0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
        try:
            with TensorChannel(0, backend="nccl", device=device, depth=2, timeout=120) as ch:
                for size in sizes:
                    batch = make_batch(size, device)
                    nbytes = batch_bytes(batch)
                    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
                    dst = torch.empty_like(src)

                    def ours():
                        ch.send(batch)  # noqa: B023 (timed in this iteration)
                        ch.recv()

                    def copy():
                        dst.copy_(src)  # noqa: B023 (timed in this iteration)

                    timed = {}
                    for name, fn in (("ours", ours), ("copy", copy)):
                        fn()
                        _sync(device)
                        t0 = time.perf_counter()
                        for _ in range(repeat):
                            fn()
                        _sync(device)
                        timed[name] = (time.perf_counter() - t0) / repeat
                    rows.append(
                        {
                            "size_mib": nbytes / MiB,
                            "ours_gbps": nbytes / timed["ours"] / 1e9,
                            "raw_gbps": nbytes / timed["copy"] / 1e9,
                        }
                    )
        finally:
            dist.destroy_process_group()
    return rows


COLUMNS = [
    Column("case", "case"),
    Column("size_mib", "batch MiB", fmt_fixed(1)),
    Column("raw_gbps", "raw GB/s", fmt_num()),
    Column("ours_gbps", "ours GB/s", fmt_num()),
    Column("ratio", "ours/raw", fmt_percent(1)),
    Column("alone_ms", "step alone ms", fmt_num()),
    Column("with_ms", "step + send/recv ms", fmt_num()),
    Column("slowdown", "slowdown", fmt_percent(1)),
    *TARGET_COLUMNS,
]


def run(args: Any) -> Report:
    device = resolve_device(args.device)
    sizes = args.sizes or ([1 * MiB, 16 * MiB] if args.quick else [1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB])
    repeat = args.repeat or (5 if args.quick else 10)
    rounds, steps, overlap_rounds = (2, 5, 2) if args.quick else (3, 5, 12)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cpu":
        transport = "gloo over TCP loopback, 2 processes, 1 thread each"
    elif gpus >= 2:
        transport = "NCCL, 2 processes on cuda:0 and cuda:1"
    else:
        transport = (
            "one GPU: NCCL refuses two ranks on one GPU, so this measures our channel sending to itself "
            "(one-rank communicator) against a device-to-device copy of the same bytes; no raw NCCL "
            "baseline and no overlap measurement are possible here"
        )
    # No threads line: each of the two processes sets its own (one).
    header = environment_header(device, threads=False) | {
        "transport": transport,
        "bandwidth": f"median of {rounds} rounds of {repeat} messages after 1 warm-up, timed on the consumer; "
        "raw = dist.isend/irecv of one buffer holding the batch's bytes",
        "overlap": f"a step (6 chained 768x768 matmuls) alone vs followed by the channel call, on the producer "
        f"(send) and on the consumer (recv) of a {overlap_size(sizes) // MiB} MiB batch: {overlap_rounds} "
        f"rounds of {steps} steps each way, slowdown = median of the rounds' ratios",
        "sizes": "quick (targets not checked)" if args.quick else "default",
    }
    report = Report("pipeline", header, COLUMNS)
    print(f"[bench pipeline] {transport}", file=sys.stderr, flush=True)
    if device.type == "cuda" and gpus < 2:
        results = {"bandwidth": _self_send(sizes, repeat), "overlap": None, "overlap_consumer": None}
        raw_name = "device copy"
    else:
        results = _two_processes(
            "nccl" if device.type == "cuda" else "gloo", sizes, repeat, rounds, steps, overlap_rounds
        )
        raw_name = "raw send/recv"
    bandwidth_goal = Goal(f"≥ {MIN_BW_FRACTION:.0%} of raw", lambda row: row["ratio"] < MIN_BW_FRACTION)
    overlap_goal = Goal(f"slowdown < {MAX_SLOWDOWN:.0%}", lambda row: row["slowdown"] >= MAX_SLOWDOWN)
    for row in results["bandwidth"]:
        row["ratio"] = row["ours_gbps"] / row["raw_gbps"]
        row["case"] = f"bandwidth vs {raw_name}"
        if not args.quick and raw_name == "raw send/recv" and row["size_mib"] * MiB >= MIN_BW_SIZE * 0.99:
            judge(row, [bandwidth_goal])
        report.rows.append(row)
    if results["overlap"] is not None:
        row = dict(results["overlap"], case="overlap (producer step)")
        if not args.quick:
            judge(row, [overlap_goal])
        report.rows.append(row)
    if results["overlap_consumer"] is not None:  # no target: the issue states the producer's
        report.rows.append(dict(results["overlap_consumer"], case="overlap (consumer step)"))
    return report


def judge(row: dict, goals: list[Goal]) -> None:
    row["target"] = target(goals)
    row["result"] = verdict(goals, row)
