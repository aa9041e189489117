"""``TensorChannel``: batches of tensors from one rank to another, in order, a few messages each.

Everything but moving bytes is shared by the transports: the wire format (:mod:`.wire`: one
header, one contiguous buffer per batch on the receiving side), sequence numbers, the bounded
in-flight queue, the buffer pools and the timeouts. A transport only starts sends and receives
of contiguous uint8 tensors and waits for them:

- ``gloo``: the send/recv of a gloo process group (CPU buffers), as ``dist.isend``/``irecv`` call them;
- ``nccl``: the compiled NCCL communicator (``_C.NcclComm``, csrc/pipeline/nccl_comm.h) with
  its own CUDA streams and an event per operation (CUDA buffers).

Per batch the sender first sends a fixed-size preamble (``wire.preamble``: total and header
bytes, and the header itself when it fits); a total of -1 marks the end of the stream
(``close()``). The receiver posts the next preamble's receive while the current batch arrives;
over gloo a receive thread posts each body's receives as soon as its preamble is there, up to
``depth`` batches ahead of ``recv()``, so that the transport does not wait for the Python between
two batches.
Then the body, which the receiver always gets as one buffer laid out as ``wire.pack`` lays it:

- NCCL: the packed buffer, one message (packing is a device copy at memory speed, and NCCL
  moves one large message best);
- gloo: each tensor of ``wire.ZERO_COPY_BYTES`` or more from its own memory into its place in
  the receiver's buffer, the smaller ones (which the layout puts first, back to back) copied
  together into one message that lands in its place too; the header goes on its own first only
  when it did not fit the preamble. On a CPU a packing copy costs as much CPU as the loopback
  transfer it feeds, so the large tensors are not copied.
"""

from __future__ import annotations

import collections
import datetime
import queue
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

import torchspec_ext
from torchspec_ext import _C
from torchspec_ext.pipeline.errors import ChannelClosed, ChannelError, ChannelTimeout, HeaderMismatch
from torchspec_ext.pipeline.wire import (
    PREAMBLE_BYTES,
    body_messages,
    body_receives,
    bytes_tensor,
    decode,
    entry_bytes,
    header_fits_inline,
    host_to_device,
    pack,
    plan,
    preamble,
    read_preamble,
    unpack,
)

__all__ = ["TensorChannel"]

_END_OF_STREAM = -1

# How long the receive thread waits for a preamble. It waits even while no recv() does (so
# recv()'s own timeout applies instead); gloo's wait needs a finite limit.
_PREFETCH_WAIT_S = 7 * 24 * 3600.0


# Gloo tags of the channels start here, away from the small tags of a job's own send/recv (a
# message of another size on the same tag would break gloo's matching).
_GLOO_TAG_BASE = 0x54530000

# How many channels this process opened with each pair of ranks: both ends count the same way,
# so the n-th channel between two ranks gets the same gloo tag / NCCL store key on both.
_pair_counts: collections.Counter = collections.Counter()


class _GlooTransport:
    scatter = True  # the body goes as body_messages(): large tensors from their own memory
    # recv() takes batches a thread posted ahead (gloo's send/recv may come from two threads; a
    # gloo channel never sends to itself, whose sends are issued with the recv)
    prefetch = True

    def __init__(self, peer: int, group, tag: int):
        # The group's own send/recv: dist.isend/irecv's checks cost a few percent per message on a CPU.
        self.group = group if group is not None else dist.group.WORLD
        self.peer, self.tag = dist.get_group_rank(self.group, peer), tag

    def send(self, buffer: Tensor):
        return self.group.send([buffer], self.peer, self.tag)

    def recv(self, buffer: Tensor):
        return self.group.recv([buffer], self.peer, self.tag)

    def done(self, work) -> bool:
        # Gloo's point-to-point work reports completion only once wait() ran on it (measured:
        # a posted receive whose bytes had arrived stayed incomplete), so this never sees an
        # early finish; the channel then waits only where it must (depth batches in flight).
        return work.is_completed()

    def wait(self, work, timeout: float) -> None:
        work.wait(datetime.timedelta(seconds=timeout))

    def abort(self) -> None:
        pass  # a gloo group cannot be aborted; the channel refuses every further call instead


class _NcclTransport:
    scatter = False  # the body goes packed, as one message
    prefetch = False  # an NCCL communicator takes calls from one thread at a time

    def __init__(self, rank: int, peer: int, device: torch.device, index: int, timeout: float, store):
        if not hasattr(_C, "NcclComm"):
            raise ChannelError("pipeline: backend='nccl' but torchspec_ext was built without NCCL (build_info())")
        low, high = sorted((rank, peer))
        nranks, me = (1, 0) if peer == rank else (2, int(rank == high))
        key = f"torchspec_ext/pipeline/nccl/{low}-{high}/{index}"
        if me == 0:
            unique_id = _C.nccl_unique_id()
            store.set(key, unique_id)
        else:
            store.wait([key], datetime.timedelta(seconds=timeout))
            unique_id = store.get(key)
        self.comm = _C.NcclComm(unique_id, me, nranks, device.index, timeout)
        self.peer = 0 if nranks == 1 else 1 - me

    def send(self, buffer: Tensor) -> int:
        return self.comm.send(buffer, self.peer)

    def recv(self, buffer: Tensor) -> int:
        return self.comm.recv(buffer, self.peer)

    def done(self, ticket: int) -> bool:
        return self.comm.done(ticket)

    def wait(self, ticket: int, timeout: float) -> None:
        self.comm.wait(ticket, timeout)

    def abort(self) -> None:
        self.comm.abort()


def _default_device() -> torch.device:
    if torch.cuda.is_available() and torchspec_ext.build_info()["nccl_version"] is not None:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _unreferenced(storage: Tensor) -> bool:
    """Whether ``storage`` is the only tensor on its memory (no view of an earlier batch alive)."""
    try:
        # Two references: `storage` itself and the temporary UntypedStorage asked about.
        return torch._C._storage_Use_Count(storage.untyped_storage()._cdata) <= 2
    except AttributeError:  # a torch without this private helper: never reuse, always correct
        return False


class _Send:
    """One batch in flight: its tickets, in send order, and the memory they read (kept alive
    until they completed); ``storage``: the packing buffer to reuse afterwards, if any."""

    __slots__ = ("tickets", "messages", "storage")

    def __init__(self, tickets: list, messages: list[Tensor], storage: Tensor | None):
        self.tickets, self.messages, self.storage = tickets, messages, storage


class TensorChannel:
    """Point-to-point channel of batches (``dict[str, Tensor]``) between this rank and ``peer``.

    Args:
        peer: the other rank (global rank of the default group). ``backend="nccl"`` allows this
            rank itself (a one-rank communicator); each send to self is then issued with the next
            ``recv()``, so send at most ``depth`` batches ahead of the receives.
        group: gloo process group for ``backend="gloo"`` (default: the default group).
        backend: ``"nccl"`` (CUDA buffers), ``"gloo"`` (CPU buffers) or ``"auto"``: by ``device``.
        depth: batches in flight per channel; ``send`` blocks only while ``depth`` are unfinished,
            and over gloo ``recv`` receives up to ``depth`` batches ahead (from its first call).
        timeout: seconds any blocking call may take before it raises ``ChannelTimeout``.
        device: where buffers and received tensors live (default: the current CUDA device when a
            GPU and an NCCL build are present, else the CPU; always the CPU for gloo).

    ``torch.distributed`` must be initialised (its store serves the NCCL set-up). Both ranks must
    open their channels with each other in the same order. Not thread-safe.
    """

    def __init__(
        self,
        peer: int,
        group=None,
        backend: str = "auto",
        depth: int = 2,
        timeout: float = 300.0,
        device: torch.device | str | None = None,
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise ChannelError("pipeline: torch.distributed must be initialised before opening a TensorChannel")
        if backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"pipeline: backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
        if not (isinstance(depth, int) and depth >= 1):
            raise ValueError(f"pipeline: depth must be an int >= 1, got {depth!r}")
        if not timeout > 0:
            raise ValueError(f"pipeline: timeout must be > 0 seconds, got {timeout!r}")
        self.rank = dist.get_rank()
        self.peer, self.depth, self.timeout = int(peer), depth, float(timeout)
        if not 0 <= self.peer < dist.get_world_size():
            raise ValueError(f"pipeline: peer {peer} is not a rank of the {dist.get_world_size()}-rank job")
        device = (
            torch.device("cpu" if backend == "gloo" else _default_device()) if device is None else torch.device(device)
        )
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if (backend == "nccl") != (device.type == "cuda"):
            raise ValueError(f"pipeline: backend '{backend}' cannot use buffers on {device} (nccl: CUDA, gloo: CPU)")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if backend == "gloo" and self.peer == self.rank:
            raise ValueError("pipeline: gloo cannot send to the same rank; a channel to itself needs backend='nccl'")
        self._init_state(backend, device)
        pair = tuple(sorted((self.rank, self.peer)))
        index = _pair_counts[pair]
        _pair_counts[pair] += 1
        if backend == "gloo":
            self._transport: Any = _GlooTransport(self.peer, group, tag=_GLOO_TAG_BASE + index)
        else:
            store = dist.distributed_c10d._get_default_store()
            self._transport = self._guard(
                lambda: _NcclTransport(self.rank, self.peer, device, index, self.timeout, store),
                "setting up NCCL",
                time.monotonic() + self.timeout,
            )

    @classmethod
    def _over(cls, transport, rank: int = 0, peer: int = 1, depth: int = 2, timeout: float = 30.0) -> TensorChannel:
        """A CPU channel over ``transport`` (the tests' in-process loopback), without torch.distributed."""
        channel = cls.__new__(cls)
        channel.rank, channel.peer, channel.depth, channel.timeout = rank, peer, depth, timeout
        channel._init_state("loopback", torch.device("cpu"))
        channel._transport = transport
        return channel

    def _init_state(self, backend: str, device: torch.device) -> None:
        self.backend, self.device = backend, device
        self._inflight: collections.deque[_Send] = collections.deque()
        self._free: list[Tensor] = []  # buffers whose sends completed, reused for the next batches
        self._recv_pool: list[Tensor] = []  # receive buffers, reused once their batch is dropped
        self._next_pre = None  # (ticket, tensor) of the next batch's preamble, posted early
        self._prefetcher: threading.Thread | None = None  # the receive thread (gloo), from the first recv()
        self._ready: queue.Queue = queue.Queue()  # what it posted, in order: batches, then None or the error
        self._slots = threading.Semaphore(self.depth)  # batches it may post ahead of recv()
        self._sent = self._received = 0
        self._error: ChannelError | None = None
        self._closed = self._peer_closed = False

    # ----------------------------------------------------------------------------- sending
    def send(self, batch: dict[str, Tensor]) -> None:
        """Queue ``batch``; returns once its send started. Blocks (up to ``timeout``) only while
        ``depth`` earlier batches are still in flight.

        Like ``dist.isend``, the gloo channel sends contiguous CPU tensors from their own memory:
        do not change them in place until the batch's send completed (``depth`` sends later, or
        ``close()``); a model's outputs, new tensors every batch, are safe. The NCCL channel
        copies them into its buffer on the current stream, after the work queued there."""
        self._check_open()
        deadline = time.monotonic() + self.timeout
        self._retire(deadline, keep=self.depth - 1)
        if self._transport.scatter:
            header, offsets, total = plan(batch, self._sent)
            messages = [preamble(total, header)]
            if not header_fits_inline(len(header)):
                messages.append(bytes_tensor(header))
            body, copied = body_messages(batch, offsets, self.device, self._take_buffer)
            messages += body
        else:
            copied, header_bytes = pack(batch, self._sent, self._take_buffer)
            messages = [host_to_device(preamble(copied.numel(), header_bytes), self.device), copied]
        storage = None if copied is None else copied if copied._base is None else copied._base  # of _take_buffer's view
        self._inflight.append(_Send(self._start_sends(messages, deadline), messages, storage))
        self._sent += 1

    def _start_sends(self, messages: list[Tensor], deadline: float) -> list:
        return self._guard(lambda: [self._transport.send(m) for m in messages], "starting a send", deadline)

    def _take_buffer(self, nbytes: int) -> Tensor:
        for i, storage in enumerate(self._free):
            if storage.numel() >= nbytes:
                return self._free.pop(i)[:nbytes]
        if len(self._free) + len(self._inflight) >= self.depth and self._free:
            self._free.pop(0)  # too small for this batch: keep at most `depth` buffers
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _retire(self, deadline: float, keep: int) -> None:
        """Releases finished sends; waits for the oldest until at most ``keep`` are in flight."""
        while self._inflight:
            oldest = self._inflight[0]
            if len(self._inflight) <= keep and not self._guard(lambda: self._done(oldest), "sending", deadline):  # noqa: B023
                return
            for ticket in oldest.tickets:
                self._wait(ticket, deadline, f"sending batch {self._sent - len(self._inflight)}")
            self._inflight.popleft()
            if oldest.storage is not None:
                self._free.append(oldest.storage)

    def _done(self, s: _Send) -> bool:
        return all(self._transport.done(t) for t in s.tickets)

    # --------------------------------------------------------------------------- receiving
    def recv(self) -> dict[str, Tensor]:
        """The next batch, in the order sent: tensors on ``device``, views into one buffer per
        batch. Raises ``ChannelClosed`` after the peer's last batch, ``ChannelTimeout`` when
        nothing arrives within ``timeout``, ``ChannelError`` if the peer fails (after the batches
        that arrived before it).

        Over gloo the first call starts a thread that posts the receives of up to ``depth`` batches
        ahead, each as soon as its preamble arrives: batches arrive while the caller computes, and
        the next body's receive is not held back while this side unpacks a batch."""
        self._check_open()
        if self._peer_closed:
            raise ChannelClosed(f"pipeline: rank {self.peer} closed the channel after {self._received} batches")
        deadline = time.monotonic() + self.timeout
        what = self._receiving(self._received)
        if self._transport.prefetch:
            posted = self._take_prefetched(deadline, what)
        else:
            try:
                posted = self._post_body(deadline, what)
            except ChannelError as exc:
                self._fail(exc)
        if posted is None:
            self._peer_closed = True
            raise ChannelClosed(f"pipeline: rank {self.peer} closed the channel after {self._received} batches")
        buffer, header_bytes, decoded, tickets = posted
        for ticket in tickets:
            self._wait(ticket, deadline, what)
        try:
            seq, batch = unpack(buffer, header_bytes, decoded)
        except HeaderMismatch as exc:
            self._fail(exc)
        if seq != self._received:
            self._fail(
                HeaderMismatch(
                    f"pipeline: expected batch {self._received} from rank {self.peer}, got sequence number {seq}"
                )
            )
        self._received += 1
        return batch

    def _post_body(self, deadline: float, what: str):
        """Waits for the next batch's preamble and posts the receives of its body (and the next
        preamble's): ``(buffer, header_bytes, decoded header or None, tickets)``, or None at the
        end of the stream. Raises ``ChannelError`` without breaking the channel (the caller does)."""
        pre_ticket, pre = self._next_pre if self._next_pre is not None else self._post_preamble_recv(what, deadline)
        self._next_pre = None
        self._await(pre_ticket, deadline, what)
        if self._closed:  # the receive thread, after close(): post nothing more
            return None
        total, header_bytes, header = read_preamble(pre)  # header: None when it did not fit inline
        if total == _END_OF_STREAM:
            return None
        if not 0 < header_bytes <= total:
            raise HeaderMismatch(
                f"pipeline: {what}: the preamble announced {total} bytes with a {header_bytes}-byte header"
            )
        buffer = self._recv_buffer(total)
        decoded = None
        if self._transport.scatter:
            if header is None:
                header = buffer[:header_bytes]
                header_ticket = self._call(lambda: self._transport.recv(header), what, deadline)
                self._await(header_ticket, deadline, what)
            decoded = decode(header)
            if decoded[1] != total:
                raise HeaderMismatch(f"pipeline header: says {decoded[1]} bytes, the preamble {total}")
            parts = body_receives(buffer, [(offset, entry_bytes(code, shape)) for _, code, shape, offset in decoded[2]])
        else:
            parts = [buffer]
        tickets = self._call(lambda: [self._transport.recv(p) for p in parts], what, deadline)
        if self.peer != self.rank:  # a send to itself is issued with its recv: nothing to post ahead
            self._next_pre = self._post_preamble_recv(what, deadline)
        return buffer, header_bytes, decoded, tickets

    def _take_prefetched(self, deadline: float, what: str):
        if self._prefetcher is None:
            self._prefetcher = threading.Thread(
                target=self._prefetch, name=f"TensorChannel-recv-{self.peer}", daemon=True
            )  # daemon: may wait on a peer that never sends again
            self._prefetcher.start()
        try:
            posted = self._ready.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            self._fail(self._timed_out(what))
        self._slots.release()
        if isinstance(posted, ChannelError):
            self._fail(posted)
        return posted

    def _prefetch(self) -> None:
        """The receive thread: posts the bodies of up to ``depth`` batches that recv() has not
        taken yet, in order; hands recv() each one, then the end of the stream or the error."""
        posted = self._received
        try:
            while True:
                self._slots.acquire()
                if self._closed:
                    if self._next_pre is not None:  # posted ahead: see _end_receive_thread
                        self._post_body(time.monotonic() + _PREFETCH_WAIT_S, self._receiving(posted))
                    return
                # No deadline here: recv() applies the timeout to what it waits for; a wait that
                # timed out would break gloo's connection, and a peer may rightly pause while no
                # recv() is waiting.
                item = self._post_body(time.monotonic() + _PREFETCH_WAIT_S, self._receiving(posted))
                self._ready.put(item)
                if item is None:
                    return
                posted += 1
        except ChannelError as exc:
            self._ready.put(exc)
        except BaseException as exc:  # noqa: BLE001 - handed to recv(), which raises it as the channel's error
            error = ChannelError(f"pipeline: the receive thread of rank {self.rank} <- {self.peer} failed: {exc!r}")
            error.__cause__ = exc
            self._ready.put(error)

    def _post_preamble_recv(self, what: str, deadline: float):
        # Posted one batch ahead, so that the sender's preamble never waits for the receiver to
        # ask for it: per batch only the body costs a round trip, as a raw send does. Over NCCL the
        # binding holds the buffer until the receive was waited for: dropped with the channel before
        # the peer's preamble came, its memory is not reused until the communicator's streams drained.
        pre = torch.empty(PREAMBLE_BYTES, dtype=torch.uint8, device=self.device)
        return self._call(lambda: self._transport.recv(pre), what, deadline), pre

    def _recv_buffer(self, nbytes: int) -> Tensor:
        """A buffer of which no tensor of an earlier batch is alive any more, else a new one
        (fresh CPU memory costs page faults per batch, as much as the copy it receives)."""
        for storage in self._recv_pool:
            if storage.numel() >= nbytes and _unreferenced(storage):
                return storage[:nbytes]
        storage = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._recv_pool.append(storage)
        if len(self._recv_pool) > 2 * self.depth + 1:  # posted ahead, being unpacked, held by the caller
            self._recv_pool.pop(0)  # the batch holding it keeps it alive; the pool forgets it
        return storage[:nbytes]  # a view, which _unreferenced counts (the pool's own tensor it does not)

    # ------------------------------------------------------------------------------ closing
    def close(self) -> None:
        """On a side that sent batches: waits (up to ``timeout``) until the peer received them and
        the end of the stream after them (its ``recv()`` raising ``ChannelClosed``), so nothing
        sent is lost unnoticed; ``ChannelTimeout`` if the peer stops reading. On a side that
        received over gloo, and did not see the end of the stream yet: waits (up to ``timeout``)
        for the peer's next message, its end of the stream or the next batch (dropped), so
        that the two sides may close in either order after the last batch; ``ChannelTimeout``
        if the peer sends nothing. Idempotent; later ``send``/``recv`` raise ``ChannelClosed``."""
        if self._closed:
            return
        try:
            # A channel to itself has no peer to tell (its marker would wait for a recv that never comes).
            if self._error is None and self._sent and self.peer != self.rank:
                deadline = time.monotonic() + self.timeout
                self._retire(deadline, keep=0)
                end = host_to_device(preamble(_END_OF_STREAM, 0), self.device)
                (ticket,) = self._start_sends([end], deadline)
                self._wait(ticket, deadline, "sending the end of the stream")
        finally:
            self._closed = True
            self._inflight.clear()
            self._free.clear()
            self._recv_pool.clear()
            self._end_receive_thread()
            if self.backend == "nccl" and self._error is None:
                self._transport.abort()  # all sends completed: nothing is lost by freeing the communicator
            # A preamble receive still posted ends with the abort (or the communicator); the binding
            # keeps its buffer until the communicator's streams drained.
            self._next_pre = None

    def _end_receive_thread(self) -> None:
        """Waits (up to ``timeout``) until the receive thread ended, which it does once the
        preamble it posted ahead arrived: a posted gloo receive ends only with a message or the
        peer's exit. A thread left in gloo's wait aborts the process if the wait ends while the
        interpreter shuts down: Python then ends the thread with ``pthread_exit``, whose unwinding
        through the GIL's release in torch's ``Work.wait`` (a noexcept destructor) calls
        ``std::terminate`` ("terminate called without an active exception")."""
        if self._prefetcher is None:
            return
        self._slots.release()  # a receive thread waiting for a slot sees the channel closed
        if isinstance(self._error, ChannelTimeout):
            return  # the peer is alive but silent: the thread may wait on it for good, waiting again is no use
        # A peer that failed fails every receive posted to it too, so the thread ends in a moment;
        # seen only by recv() first, it may still be waking up.
        self._prefetcher.join(self.timeout)
        if self._error is not None:
            return
        if self._prefetcher.is_alive():
            self._fail(
                ChannelTimeout(
                    f"pipeline: closing the channel from rank {self.peer}: it sent neither "
                    f"the end of its stream nor another batch within {self.timeout:g} s"
                )
            )

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    @property
    def peer_closed(self) -> bool:
        """Whether the peer's end of the stream was received."""
        return self._peer_closed

    def __enter__(self) -> TensorChannel:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except ChannelError:
            pass  # the exception already on its way out is the one to see

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self._error else "open"
        return (
            f"TensorChannel(rank={self.rank}, peer={self.peer}, backend={self.backend!r}, device={self.device}, "
            f"depth={self.depth}, sent={self._sent}, received={self._received}, {state})"
        )

    # ------------------------------------------------------------------------------ errors
    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed(f"pipeline: the channel to rank {self.peer} is closed")
        if self._error is not None:
            raise ChannelError(f"pipeline: the channel to rank {self.peer} failed earlier: {self._error}")

    def _receiving(self, batch: int) -> str:
        return f"receiving batch {batch} from rank {self.peer}"

    def _timed_out(self, what: str) -> ChannelTimeout:
        return ChannelTimeout(
            f"pipeline: {what} (rank {self.rank} <-> {self.peer}) did not complete within {self.timeout:g} s"
        )

    def _wait(self, ticket, deadline: float, what: str) -> None:
        self._guard(lambda: self._await(ticket, deadline, what), what, deadline)

    def _await(self, ticket, deadline: float, what: str) -> None:
        """``_wait`` without breaking the channel on failure (the receive thread's)."""
        self._call(lambda: self._transport.wait(ticket, max(deadline - time.monotonic(), 1e-3)), what, deadline)

    def _guard(self, fn, what: str, deadline: float):
        """Runs a transport call; any failure breaks the channel and is raised as a ChannelError."""
        try:
            return self._call(fn, what, deadline)
        except ChannelError as exc:
            self._fail(exc)

    def _call(self, fn, what: str, deadline: float):
        """Runs a transport call; any failure is raised as a ChannelError (a ChannelTimeout past
        ``deadline``), without breaking the channel: that is the caller's to do."""
        try:
            return fn()
        except ChannelError:
            raise
        except Exception as exc:  # gloo raises RuntimeError, the NCCL channel RuntimeError / TimeoutError
            if isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
                error: ChannelError = self._timed_out(what)
            else:
                error = ChannelError(f"pipeline: {what} (rank {self.rank} <-> {self.peer}) failed: {exc}")
            raise error from exc

    def _fail(self, error: ChannelError):
        if self._error is None:
            self._error = error
            try:
                self._transport.abort()
            except Exception:  # noqa: BLE001 - the error being raised is the one that matters
                pass
        raise error
