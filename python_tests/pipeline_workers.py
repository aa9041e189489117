"""Helpers of test_pipeline.py: distributed jobs in spawned processes on 127.0.0.1, and batches."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import time
import traceback

import torch

# The dtypes the issue names, and a few more the wire format carries.
BATCH_DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.bool]
EXTRA_DTYPES = [torch.float16, torch.int32, torch.uint8]


def random_batch(seed: int, max_numel: int = 2000, max_dim: int = 8) -> dict[str, torch.Tensor]:
    """A reproducible batch: 1 to 5 tensors of random names, dtypes, shapes (0-d and empty
    included; each dimension up to ``max_dim``) and random bits (NaN payloads included); some
    non-contiguous."""
    g = torch.Generator().manual_seed(seed)

    def rand(hi: int) -> int:
        return int(torch.randint(0, hi, (), generator=g))

    batch = {}
    for i in range(1 + rand(5)):
        dtype = BATCH_DTYPES[rand(4)] if rand(8) else EXTRA_DTYPES[rand(3)]
        shape = [rand(max_dim + 1) for _ in range(rand(4))]
        while shape and torch.Size(shape).numel() > max_numel:
            shape[rand(len(shape))] //= 2
        numel = torch.Size(shape).numel()
        if dtype == torch.bool:
            t = torch.randint(0, 2, (numel,), generator=g, dtype=torch.uint8).view(torch.bool)
        else:
            t = torch.randint(0, 256, (numel * dtype.itemsize,), generator=g, dtype=torch.uint8).view(dtype)
        t = t.view(shape)
        if t.dim() >= 2 and rand(3) == 0:
            t = t.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous layout
        batch[f"t{i}_{rand(1000)}"] = t
    return batch


def large_batch(seed: int) -> dict[str, torch.Tensor]:
    """A random batch whose tensors go up to a few MiB: some travel alone, from their own memory."""
    return random_batch(seed, max_numel=1_000_000, max_dim=300)


def many_tensors_batch(seed: int) -> dict[str, torch.Tensor]:
    """80 small tensors with long names: a header too long to travel inside the preamble."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"tensor_{i}_with_a_name_long_enough_to_fill_the_header": torch.randn(i % 7, 3, generator=g) for i in range(80)
    }


def teacher_batch(seed: int) -> dict[str, torch.Tensor]:
    """What a teacher sends in online training: ids, mask, 3 layers' hidden states, top-k and lse."""
    g = torch.Generator().manual_seed(seed)
    tokens, hidden, k = 32 + seed % 7, 64, 8
    return {
        "input_ids": torch.randint(0, 50000, (tokens,), generator=g),
        "loss_mask": torch.rand(tokens, generator=g) > 0.3,
        "hidden_states": torch.randn(3, tokens, hidden, generator=g).to(torch.bfloat16),
        "topk_logprobs": torch.randn(tokens, k, generator=g),
        "topk_indices": torch.randint(0, 50000, (tokens, k), generator=g),
        "lse": torch.randn(tokens, generator=g),
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8).cpu(), b.contiguous().reshape(-1).view(torch.uint8).cpu()
    )


def assert_same_batch(got: dict, want: dict, what: str) -> None:
    assert list(got) == list(want), f"{what}: names {list(got)} != {list(want)}"
    for name in want:
        assert same_bits(got[name], want[name]), (
            f"{what}: '{name}' differs: {got[name].dtype}{list(got[name].shape)} vs "
            f"{want[name].dtype}{list(want[name].shape)}"
        )


def init(rank: int, world: int, store_path: str, timeout_s: float = 30.0) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )


def _entry(fn, rank, world, store_path, results, args):
    try:
        init(rank, world, store_path)
        out = fn(rank, world, *args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, "error", traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()  # the queue's feeder thread must deliver before the hard exit
        os._exit(0)  # no process-group teardown: a peer may already be gone


def run_job(fn, world: int, tmp_path, args=(), timeout: float = 60.0, expect_lost=()) -> dict:
    """Runs ``fn(rank, world, *args)`` in ``world`` spawned processes; returns {rank: result}.
    Raises AssertionError with the child's traceback if one failed; kills all after ``timeout``.
    Ranks in ``expect_lost`` may die without reporting."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store_path = str(tmp_path / f"store_{time.monotonic_ns()}")
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, store_path, results, args), daemon=True) for r in range(world)
    ]
    for p in procs:
        p.start()
    out, deadline, finished = {}, time.monotonic() + timeout, False
    try:
        while len(out) < world - len(expect_lost):
            try:
                rank, status, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # queue.Empty
                raise AssertionError(f"job did not finish within {timeout} s; reported: {sorted(out)}") from None
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = value
        finished = True
    finally:
        for p in procs:
            # After a failure the others may be blocked on the failed rank: kill them at once.
            p.join(timeout=max(0.1, deadline - time.monotonic()) if finished and not expect_lost else 1.0)
            if p.is_alive():
                p.kill()
                p.join(5)
    return out
