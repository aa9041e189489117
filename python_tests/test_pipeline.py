"""Tensor pipeline: wire format, routes, and multi-process channels over gloo (CPU); the NCCL
path sends to itself through a one-rank communicator where a GPU is present."""

import collections
import datetime
import math
import os
import signal
import threading
import time

import pytest
import torch

import torchspec_ext
from torchspec_ext.pipeline import (
    ChannelClosed,
    ChannelError,
    ChannelTimeout,
    HeaderMismatch,
    Router,
    TensorChannel,
    routes,
)
from torchspec_ext.pipeline.wire import ZERO_COPY_BYTES, pack, plan, preamble, read_preamble, unpack

import pipeline_soak
from conftest import HAS_GPU
from pipeline_workers import assert_same_batch, large_batch, many_tensors_batch, random_batch, run_job, teacher_batch

HAS_NCCL = torchspec_ext.build_info()["nccl_version"] is not None


def _cpu_alloc(n):
    return torch.empty(n, dtype=torch.uint8)


# ------------------------------------------------------------------------- wire format, in process
def test_pack_unpack_bit_exact():
    for seed in range(200):
        batch = random_batch(seed)
        buffer, header_bytes = pack(batch, seed, _cpu_alloc)
        seq, got = unpack(buffer, header_bytes)
        assert seq == seed
        assert_same_batch(got, batch, f"seed {seed}")
        for name, t in got.items():  # every tensor starts on a 64-byte boundary of the buffer
            assert (t.data_ptr() - buffer.data_ptr()) % 64 == 0, name


def test_unpacked_tensors_are_views_of_the_buffer():
    buffer, header_bytes = pack(teacher_batch(0), 0, _cpu_alloc)
    _, got = unpack(buffer, header_bytes)
    buffer.zero_()
    assert not got["input_ids"].any() and not got["hidden_states"].float().any()


@pytest.mark.parametrize(
    "byte, value, message",
    [(0, 0x55, "bad magic"), (4, 9, "version"), (24, 0x01, "does not fit"), (32, 0xEE, "unknown dtype")],
)
def test_corrupt_header_raises(byte, value, message):
    buffer, header_bytes = pack(teacher_batch(1), 7, _cpu_alloc)
    buffer[byte] = value
    with pytest.raises(HeaderMismatch, match=message):
        unpack(buffer, header_bytes)


def test_overlapping_entries_raise():
    buffer, header_bytes = pack({"a": torch.ones(4), "b": torch.ones(4)}, 0, _cpu_alloc)
    first_offset = 32 + 8  # prefix, then entry "a": dtype, ndim, name length, reserved, offset
    second_offset = 32 + 24 + 8 + 1 + 8  # entry "a" (24 B + one dimension + its name), then "b"'s offset
    buffer[second_offset : second_offset + 8] = buffer[first_offset : first_offset + 8]
    with pytest.raises(HeaderMismatch, match="overlap"):
        unpack(buffer, header_bytes)


def test_small_tensors_are_laid_out_first_back_to_back():
    batch = {
        "big": torch.zeros(ZERO_COPY_BYTES // 4 + 1),
        "ids": torch.zeros(5, dtype=torch.long),
        "mask": torch.zeros(7, dtype=torch.bool),
    }
    _, offsets, total = plan(batch, 0)
    assert offsets[1] < offsets[2] < offsets[0]  # small ones first, each group in the batch's order
    assert offsets[2] - offsets[1] == 64 and offsets[0] - offsets[2] == 64  # aligned, no gaps


def test_truncated_buffer_raises():
    buffer, header_bytes = pack(teacher_batch(2), 0, _cpu_alloc)
    with pytest.raises(HeaderMismatch, match="bytes"):
        unpack(buffer[:-64].clone(), header_bytes)


class Loopback:
    """An in-process transport: the n-th receive posted gets the n-th message sent, which must
    have the receive's exact size (as gloo requires); waits may come from two threads, in any
    order. ``scatter`` and ``prefetch`` as the gloo (True, True) or NCCL (False, False) one."""

    def __init__(self, scatter: bool, prefetch: bool):
        self.scatter, self.prefetch = scatter, prefetch
        self.messages, self.receives, self.sent_from = collections.deque(), collections.deque(), set()
        self.changed = threading.Condition()
        self.mismatch = None

    def send(self, message):
        with self.changed:
            self.sent_from.add(message.data_ptr())
            self.messages.append(message.clone())  # the sender may reuse its buffers once done()
            self._deliver()
        return None

    def recv(self, target):
        ticket = {"target": target, "arrived": False}
        with self.changed:
            self.receives.append(ticket)
            self._deliver()
        return ticket

    def _deliver(self):
        while self.messages and self.receives:
            message, ticket = self.messages.popleft(), self.receives.popleft()
            if message.numel() != ticket["target"].numel():
                self.mismatch = (message.numel(), ticket["target"].numel())
            ticket["target"].copy_(message[: ticket["target"].numel()])
            ticket["arrived"] = True
        self.changed.notify_all()

    def done(self, ticket) -> bool:
        return ticket is None or ticket["arrived"]

    def wait(self, ticket, timeout: float) -> None:
        if ticket is not None:  # a receive
            with self.changed:
                if not self.changed.wait_for(lambda: ticket["arrived"], timeout):
                    raise TimeoutError("loopback: no message arrived")

    def abort(self) -> None:
        pass


@pytest.mark.parametrize(
    "scatter,prefetch",
    [(True, True), (False, False), (True, False), (False, True)],
    ids=["gloo", "packed", "scatter-no-thread", "packed-thread"],
)
def test_channel_logic_round_trip_bit_exact(scatter, prefetch):
    """The channel's own send/recv over a loopback, on batches of every size in turn, bit for bit."""
    batches = [many_tensors_batch(1)]  # a header too long for the preamble: a message of its own
    batches += [random_batch(s) for s in range(100)] + [large_batch(s) for s in range(20)] + [many_tensors_batch(0)]
    batches += [random_batch(s) for s in range(200, 230)] + [teacher_batch(s) for s in range(30)]
    transport = Loopback(scatter, prefetch)
    sender, receiver = TensorChannel._over(transport, 0, 1), TensorChannel._over(transport, 1, 0)
    large_seen = 0
    for start in range(0, len(batches), 3):  # a few in flight at a time
        group = batches[start : start + 3]
        for batch in group:
            sender.send(batch)
        for i, batch in enumerate(group):
            assert_same_batch(receiver.recv(), batch, f"batch {start + i}")
        for name, t in (b for batch in group for b in batch.items()):
            if scatter and t.numel() * t.element_size() >= ZERO_COPY_BYTES and t.is_contiguous():
                large_seen += 1  # a large tensor is a message of its own, sent from its memory
                assert t.data_ptr() in transport.sent_from, name
    assert not scatter or large_seen >= 5
    sender.close()
    with pytest.raises(ChannelClosed, match="after 182 batches"):
        receiver.recv()
    assert transport.mismatch is None, transport.mismatch
    assert not transport.messages and not transport.receives
    assert (receiver._prefetcher is not None) == prefetch
    if prefetch:
        receiver._prefetcher.join(5)
        assert not receiver._prefetcher.is_alive()  # it ended with the stream


def test_receive_thread_hands_over_batches_then_the_error():
    """Batches whose receives the thread posted before the peer's failure are delivered first;
    then the failure, as the channel's error."""
    transport = Loopback(scatter=True, prefetch=True)
    sender, receiver = TensorChannel._over(transport, 0, 1), TensorChannel._over(transport, 1, 0)
    for s in range(2):
        sender.send(teacher_batch(s))
    transport.send(preamble(128, bytes([0x5A] * 64)))  # a preamble with a foreign header
    for s in range(2):
        assert_same_batch(receiver.recv(), teacher_batch(s), f"batch {s}")
    with pytest.raises(HeaderMismatch, match="bad magic"):
        receiver.recv()
    with pytest.raises(ChannelError, match="failed earlier"):
        receiver.recv()


def test_receive_thread_times_out_as_recv():
    """Nothing sent: recv() raises ChannelTimeout after the channel's timeout, from the thread's channel too."""
    receiver = TensorChannel._over(Loopback(scatter=True, prefetch=True), 1, 0, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(ChannelTimeout, match="receiving batch 0 from rank 0 .* did not complete within 0.5 s"):
        receiver.recv()
    assert 0.4 < time.monotonic() - t0 < 5.0
    receiver.close()


def test_preamble_carries_sizes_and_a_short_header():
    header = bytes(range(200))
    total, header_bytes, inline = read_preamble(preamble(123456789, header))
    assert (total, header_bytes) == (123456789, 200) and bytes(inline.tolist()) == header
    total, header_bytes, inline = read_preamble(preamble(10**6, 10**5))  # a header too long to go inline
    assert (total, header_bytes, inline) == (10**6, 10**5, None)
    assert read_preamble(preamble(-1, 0))[:2] == (-1, 0)


def test_unsupported_dtype_is_named():
    with pytest.raises(TypeError, match="'x' has dtype torch.complex64"):
        pack({"x": torch.zeros(2, dtype=torch.complex64)}, 0, _cpu_alloc)


# ---------------------------------------------------------------------------------- routes
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 6])
def test_routes_deliver_every_batch_once_in_order(n, m):
    teachers = list(range(10, 10 + n))
    trainers = list(range(20, 20 + m))[::-1]  # any rank order
    r_teacher = {t: routes(teachers, trainers, t) for t in teachers}
    r_trainer = {t: routes(teachers, trainers, t) for t in trainers}
    assert all(r.role == "teacher" for r in r_teacher.values()) and all(r.role == "trainer" for r in r_trainer.values())
    # Simulate: teachers send K batches each; every (teacher, trainer) channel is a FIFO.
    K = 2 * math.lcm(n, m)
    fifo = {}
    for k in range(K):
        for j, t in enumerate(teachers):
            g = k * n + j
            dst = r_teacher[t].peers[k % len(r_teacher[t].peers)]
            assert dst == trainers[g % m]
            fifo.setdefault((t, dst), []).append(g)
    for r, t in enumerate(trainers):
        got = []
        for i in range(K * n // m):
            src = r_trainer[t].peers[i % len(r_trainer[t].peers)]
            got.append(fifo[(src, t)].pop(0))
        assert got == list(range(r, K * n, m))  # its share of the global order, in order
    assert all(not q for q in fifo.values())
    # Only pairs with j ≡ r (mod gcd) talk.
    d = math.gcd(n, m)
    for j, t in enumerate(teachers):
        assert set(r_teacher[t].peers) == {trainers[r] for r in range(m) if r % d == j % d}


def test_routes_reject_bad_layouts():
    with pytest.raises(ValueError, match="both teacher and trainer"):
        routes([0, 1], [1, 2], 0)
    with pytest.raises(ValueError, match="listed twice"):
        routes([0, 0], [1], 0)
    assert routes([0], [1], 5).role == "idle"


# ------------------------------------------------------------------------ arguments, in process
def test_channel_arguments_are_checked(tmp_path, monkeypatch):
    import torch.distributed as dist

    with pytest.raises(ChannelError, match="must be initialised"):
        TensorChannel(0)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for kwargs, message in [
            (dict(peer=0, backend="mpi"), "backend must be"),
            (dict(peer=0, depth=0), "depth must be"),
            (dict(peer=0, timeout=0), "timeout must be"),
            (dict(peer=3), "peer 3 is not a rank"),
            (dict(peer=0, backend="gloo"), "gloo cannot send to the same rank"),
            (dict(peer=0, backend="nccl", device="cpu"), "cannot use buffers on cpu"),
        ]:
            with pytest.raises(ValueError, match=message):
                TensorChannel(**kwargs)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ multi-process jobs (gloo)
def _job_one_to_one(rank, world):
    """300 random batches bit for bit, end of stream, bounded in-flight sends, a stopped peer
    (timeout), a header that does not match."""
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    result = {}
    with TensorChannel(1 - rank, depth=2, timeout=30) as ch:
        assert ch.backend == "gloo" and ch.device.type == "cpu"
        seeds = list(range(300))
        extra = [large_batch(s) for s in range(12)] + [many_tensors_batch(0)]
        if rank == 0:
            for s in seeds:
                ch.send(random_batch(s))
            for batch in extra:
                ch.send(batch)
            big = {"hidden": torch.randn(3, 512, 1024).to(torch.bfloat16), "ids": torch.arange(512)}
            ch.send(big)
        else:
            kept = {}  # batches still held while later ones arrive: their buffers must not be reused
            for s in seeds:
                batch = ch.recv()
                assert_same_batch(batch, random_batch(s), f"batch {s}")
                if s % 50 == 0:
                    kept[s] = batch
            for s, batch in kept.items():
                assert_same_batch(batch, random_batch(s), f"kept batch {s}")
            for i, want in enumerate(extra):  # large tensors sent from their memory; a header not inline
                assert_same_batch(ch.recv(), want, f"extra batch {i}")
            got = ch.recv()
            assert got["hidden"].shape == (3, 512, 1024) and torch.equal(got["ids"], torch.arange(512))
            with pytest.raises(ChannelClosed, match="closed the channel after 314 batches"):
                ch.recv()
    if rank == 1:
        with pytest.raises(ChannelClosed, match="is closed"):
            ch.recv()

    # send() returns once queued and blocks only when `depth` batches are in flight.
    with TensorChannel(1 - rank, depth=2, timeout=30) as ch:
        if rank == 0:
            t0 = time.monotonic()
            ch.send(teacher_batch(0))
            ch.send(teacher_batch(1))
            result["queued_s"] = time.monotonic() - t0
            ch.send(teacher_batch(2))
            result["third_s"] = time.monotonic() - t0
        else:
            time.sleep(3.0)
            for s in range(3):
                assert_same_batch(ch.recv(), teacher_batch(s), f"batch {s}")
            with pytest.raises(ChannelClosed):  # the sender's close() waits for this
                ch.recv()

    # Once the receiver reads, its thread receives `depth` batches ahead: the sender's sends
    # complete while the receiver is busy, and no more than that many wait unread.
    with TensorChannel(1 - rank, depth=2, timeout=30) as ch:
        if rank == 0:
            ch.send(teacher_batch(0))
            store.wait(["reading"])
            t0 = time.monotonic()
            for s in range(1, 5):
                ch.send(teacher_batch(s))  # 1 and 2 received ahead, 3 and 4 in flight
            result["ahead_s"] = time.monotonic() - t0
            ch.send(teacher_batch(5))  # waits for 3, received only after the receiver took 1
            result["beyond_s"] = time.monotonic() - t0
        else:
            assert_same_batch(ch.recv(), teacher_batch(0), "batch 0")
            store.set("reading", "1")
            time.sleep(3.0)
            for s in range(1, 6):
                assert_same_batch(ch.recv(), teacher_batch(s), f"batch {s}")
            with pytest.raises(ChannelClosed):
                ch.recv()

    # A header that does not match: a well-formed preamble carrying foreign bytes as the header.
    ch = TensorChannel(1 - rank, timeout=30)
    if rank == 0:
        ch._transport.send(preamble(128, bytes([0x5A] * 64))).wait()
    else:
        with pytest.raises(HeaderMismatch, match="bad magic"):
            ch.recv()
    # A peer that stops sending: recv raises ChannelTimeout within the timeout. Last: after a gloo
    # timeout gloo closes its connection between the two ranks, so later channels of the pair would fail.
    ch = TensorChannel(1 - rank, timeout=2.0)
    if rank == 1:
        t0 = time.monotonic()
        with pytest.raises(ChannelTimeout, match="did not complete within 2 s"):
            ch.recv()
        result["timeout_s"] = time.monotonic() - t0
        with pytest.raises(ChannelError, match="failed earlier"):
            ch.recv()
        store.set("timeout_seen", "1")
    else:
        store.wait(["timeout_seen"])

    return result


def test_one_to_one_gloo(tmp_path):
    out = run_job(_job_one_to_one, 2, tmp_path, timeout=80)
    assert out[0]["queued_s"] < 1.5, out[0]  # two sends queue without the receiver
    assert out[0]["third_s"] > 1.5, out[0]  # the third waits for the receiver (3 s asleep)
    assert out[0]["ahead_s"] < 1.5, out[0]  # received ahead while the receiver sleeps 3 s
    assert out[0]["beyond_s"] > 1.5, out[0]
    assert 1.9 < out[1]["timeout_s"] < 6.0, out[1]


def _job_killed_sender(rank, world):
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    ch = TensorChannel(1 - rank, depth=2, timeout=8.0)
    if rank == 0:
        for s in range(5):
            ch.send(random_batch(s))
        store.wait(["got_5"])
        ch.send(random_batch(5))
        os.kill(os.getpid(), signal.SIGKILL)  # mid-stream, a batch in flight
    for s in range(5):
        assert_same_batch(ch.recv(), random_batch(s), f"batch {s}")
    store.set("got_5", "1")
    t0 = time.monotonic()
    received = 5
    with pytest.raises(ChannelError) as info:
        while True:  # the 6th batch may or may not have left the sender before it died
            assert_same_batch(ch.recv(), random_batch(received), f"batch {received}")
            received += 1
    assert not isinstance(info.value, ChannelClosed), info.value
    return {"elapsed": time.monotonic() - t0, "received": received, "error": str(info.value)}


def test_killed_sender_raises_within_timeout(tmp_path):
    out = run_job(_job_killed_sender, 2, tmp_path, timeout=60, expect_lost=(0,))
    assert out[1]["elapsed"] < 8.0 + 2.0, out[1]
    assert out[1]["received"] in (5, 6), out[1]


def _job_receiver_closes_early(rank, world):
    """The receiver closes after one batch while the sender goes on: its receive thread ends
    (a thread left in gloo's wait could abort the process at exit), and the sender, whose
    batches nobody takes any more, gets an error within its timeout."""
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    ch = TensorChannel(1 - rank, depth=2, timeout=3.0)
    if rank == 0:
        t0 = time.monotonic()
        with pytest.raises(ChannelError):
            for s in range(100):
                ch.send(teacher_batch(s))
        elapsed = time.monotonic() - t0
        store.set("sender_done", "1")
        return elapsed
    assert_same_batch(ch.recv(), teacher_batch(0), "batch 0")
    ch.close()
    alive = ch._prefetcher.is_alive()
    store.wait(["sender_done"], datetime.timedelta(seconds=30))
    return alive


def test_receiver_closing_early_ends_its_thread(tmp_path):
    out = run_job(_job_receiver_closes_early, 2, tmp_path, timeout=60)
    assert out[1] is False, "the receive thread outlived close()"
    assert out[0] < 3.0 + 3.0, out


def _job_stopped_receiver(rank, world):
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    ch = TensorChannel(1 - rank, depth=1, timeout=2.0)
    if rank == 1:  # never receives
        store.wait(["sender_done"], datetime.timedelta(seconds=30))
        return None
    ch.send(teacher_batch(0))  # queued: one batch may be in flight
    t0 = time.monotonic()
    with pytest.raises(ChannelTimeout, match="sending batch 0"):
        ch.send(teacher_batch(1))  # waits for the first, which nobody receives
    elapsed = time.monotonic() - t0
    with pytest.raises(ChannelError, match="failed earlier"):
        ch.send(teacher_batch(2))
    ch.close()  # a failed channel closes without waiting
    store.set("sender_done", "1")
    return elapsed


def test_stopped_receiver_makes_send_raise_within_timeout(tmp_path):
    out = run_job(_job_stopped_receiver, 2, tmp_path, timeout=60)
    assert 1.9 < out[0] < 6.0, out


def _job_route(rank, world, teachers, trainers, per_teacher, tag):
    """Teachers send `per_teacher` batches each (global index g = k * n + j); trainers check them."""
    n = len(teachers)
    with Router(teachers, trainers, depth=2, timeout=30) as router:
        if router.route.role == "teacher":
            j = teachers.index(rank)
            for k in range(per_teacher):
                g = k * n + j
                batch = teacher_batch(g) if g % 2 else random_batch(g)
                batch["g"] = torch.tensor(g)
                router.send(batch)
            return {"role": "teacher"}
        got = []
        for batch in router:
            g = int(batch.pop("g"))
            assert_same_batch(batch, teacher_batch(g) if g % 2 else random_batch(g), f"{tag} batch {g}")
            got.append(g)
        return {"role": "trainer", "got": got}


def _job_layouts_3(rank, world):
    return {
        "1->2": _job_route(rank, world, [0], [1, 2], 60, "1->2"),
        "2->1": _job_route(rank, world, [0, 1], [2], 60, "2->1"),
    }


def _expected(rank, teachers, trainers, per_teacher):
    n, m = len(teachers), len(trainers)
    return list(range(trainers.index(rank), n * per_teacher, m))


def test_layouts_one_to_two_and_two_to_one(tmp_path):
    out = run_job(_job_layouts_3, 3, tmp_path, timeout=80)
    assert out[1]["1->2"]["got"] == _expected(1, [0], [1, 2], 60)
    assert out[2]["1->2"]["got"] == _expected(2, [0], [1, 2], 60)
    assert out[2]["2->1"]["got"] == list(range(120))


def test_layout_two_to_three(tmp_path):
    out = run_job(_job_route, 5, tmp_path, args=([0, 1], [2, 3, 4], 30, "2->3"), timeout=80)
    for r in (2, 3, 4):
        assert out[r]["got"] == _expected(r, [0, 1], [2, 3, 4], 30), (r, out[r])


# ---------------------------------------------------------------------------- NCCL (GPU only)
def _job_nccl_self(rank, world):
    dev = torch.device("cuda", 0)
    with TensorChannel(0, backend="nccl", depth=2, timeout=60) as ch:
        assert ch.device == dev
        for s in range(0, 100, 2):  # two in flight, then their two receives
            batches = [random_batch(s), random_batch(s + 1)]
            for b in batches:
                ch.send({k: v.to(dev) for k, v in b.items()})
            for i, b in enumerate(batches):
                got = ch.recv()
                assert all(t.device == dev for t in got.values())
                assert_same_batch(got, b, f"batch {s + i}")
        big = torch.randn((64 << 20) // 4, device=dev)  # 64 MiB
        ch.send({"big": big})
        assert torch.equal(ch.recv()["big"], big)
    return True


def _job_nccl_teardown(rank, world):
    """The receiver drops its channel while the next preamble's receive is posted, then frees the
    batches it received (views of buffers that outlive the communicator): no crash at the free, and
    the buffers of the operations never waited for are released once the aborted streams drained."""
    import gc

    import torch.distributed as dist

    from torchspec_ext import _C

    store = dist.distributed_c10d._get_default_store()
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    ch = TensorChannel(1 - rank, backend="nccl", depth=2, timeout=60, device=dev)
    if rank == 0:
        for s in range(3):
            ch.send({k: v.to(dev) for k, v in random_batch(s).items()})
        store.wait(["dropped"])
        ch._transport.abort()
        del ch
        gc.collect()
        return True
    kept = [ch.recv() for _ in range(3)]
    assert ch._transport.comm.held_buffers == 1  # the next preamble's receive, posted ahead
    del ch
    gc.collect()
    store.set("dropped", "1")
    for s, batch in enumerate(kept):
        assert_same_batch(batch, random_batch(s), f"batch {s}")
    del kept, batch
    gc.collect()
    torch.cuda.synchronize()
    deadline = time.monotonic() + 60
    while _C.nccl_graveyard_size() and time.monotonic() < deadline:
        time.sleep(0.05)
    return _C.nccl_graveyard_size() == 0


@pytest.mark.cuda
@pytest.mark.skipif(
    not (HAS_GPU and HAS_NCCL and torch.cuda.device_count() >= 2), reason="needs two CUDA GPUs and an NCCL build"
)
def test_nccl_buffers_outlive_their_channel(tmp_path):
    assert run_job(_job_nccl_teardown, 2, tmp_path, timeout=180) == {0: True, 1: True}


@pytest.mark.parametrize("scenario", pipeline_soak.SCENARIOS)
def test_channel_endings(scenario):
    """Two processes that exit as a user's script does, or die mid-stream (pipeline_soak.py): exit
    codes, no abort at exit, every batch bit for bit and in order, the healthy endings never
    raising. `python python_tests/pipeline_soak.py 20` repeats each 20 times."""
    runs = int(os.environ.get("TORCHSPEC_SOAK_RUNS", "2"))
    problems = [f"run {i}: {p}" for i in range(runs) for p in pipeline_soak.run_once(scenario, i)]
    assert not problems, "\n".join(problems)


@pytest.mark.cuda
@pytest.mark.skipif(not (HAS_GPU and HAS_NCCL), reason="needs a CUDA GPU and an NCCL build")
def test_nccl_send_to_self(tmp_path):
    assert run_job(_job_nccl_self, 1, tmp_path, timeout=120)[0] is True
