"""Which teacher rank's batch goes to which trainer rank, and a ``Router`` that follows it.

With ``n`` teachers and ``m`` trainers, number the batches globally: teacher ``j`` (its index in
``teachers``) makes batches ``g = k * n + j`` for ``k = 0, 1, ...`` and batch ``g`` goes to trainer
``g % m``. So:

- 1 teacher -> m trainers: batch ``k`` goes to trainer ``k % m`` (round robin);
- n teachers -> 1 trainer: the trainer takes one batch from each teacher in turn;
- n -> m: both at once; each teacher cycles through ``m / gcd(n, m)`` trainers, each trainer
  through ``n / gcd(n, m)`` teachers, and teacher ``j`` talks to trainer ``r`` iff
  ``j ≡ r (mod gcd(n, m))``.

Every trainer sees its batches in global order ``g``. When teachers send equal numbers of
batches, each trainer gets all of its batches and then ``ChannelClosed`` (the next teacher in its
cycle has closed), so ``for batch in router`` ends cleanly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from torchspec_ext.pipeline.channel import TensorChannel
from torchspec_ext.pipeline.errors import ChannelClosed, ChannelError

__all__ = ["Route", "routes", "Router"]


@dataclass(frozen=True)
class Route:
    """What one rank does: ``role`` "teacher" (sends its k-th batch to ``peers[k % len(peers)]``),
    "trainer" (receives its k-th batch from ``peers[k % len(peers)]``) or "idle" (no peers)."""

    rank: int
    role: str
    peers: tuple[int, ...]


def routes(teachers: Sequence[int], trainers: Sequence[int], rank: int) -> Route:
    """The route of ``rank`` when ``teachers`` send to ``trainers`` (see the module docstring)."""
    teachers, trainers = list(teachers), list(trainers)
    if not teachers or not trainers:
        raise ValueError("pipeline: routes need at least one teacher and one trainer rank")
    if len(set(teachers)) != len(teachers) or len(set(trainers)) != len(trainers):
        raise ValueError(f"pipeline: a rank is listed twice in teachers={teachers} or trainers={trainers}")
    if set(teachers) & set(trainers):
        raise ValueError(f"pipeline: ranks {sorted(set(teachers) & set(trainers))} are both teacher and trainer")
    n, m = len(teachers), len(trainers)
    if rank in teachers:
        j = teachers.index(rank)
        return Route(rank, "teacher", tuple(trainers[(k * n + j) % m] for k in range(m // math.gcd(n, m))))
    if rank in trainers:
        r = trainers.index(rank)
        return Route(rank, "trainer", tuple(teachers[(r + k * m) % n] for k in range(n // math.gcd(n, m))))
    return Route(rank, "idle", ())


class Router:
    """The channels of this rank's route: ``send`` on a teacher, ``recv`` (or iteration) on a trainer.

    Keyword arguments go to every ``TensorChannel`` (``backend``, ``depth`` per channel,
    ``timeout``, ``group``, ``device``). All ranks of the job must construct their Router with the
    same ``teachers`` and ``trainers``.
    """

    def __init__(self, teachers: Sequence[int], trainers: Sequence[int], **channel_kwargs):
        self.route = routes(teachers, trainers, dist.get_rank())
        rank = self.route.rank
        # Channels open in one global order of rank pairs, so NCCL set-ups that wait for their peer
        # cannot wait on each other in a cycle.
        peers = sorted(set(self.route.peers), key=lambda p: (min(rank, p), max(rank, p)))
        self.channels: dict[int, TensorChannel] = {}
        try:
            for peer in peers:
                self.channels[peer] = TensorChannel(peer, **channel_kwargs)
        except BaseException:
            self.close()
            raise
        self._count = 0

    def send(self, batch: dict[str, Tensor]) -> int:
        """Sends the next batch to the trainer whose turn it is; returns that trainer's rank."""
        peer = self._next("teacher")
        self.channels[peer].send(batch)
        self._count += 1
        return peer

    def recv(self) -> dict[str, Tensor]:
        """The next batch from the teacher whose turn it is (``ChannelClosed`` once it closed)."""
        batch = self.channels[self._next("trainer")].recv()
        self._count += 1
        return batch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        """A trainer's batches until the stream ends (a teacher in its cycle closed)."""
        while True:
            try:
                yield self.recv()
            except ChannelClosed:
                return

    def _next(self, role: str) -> int:
        if self.route.role != role:
            raise ChannelError(
                f"pipeline: rank {self.route.rank} is a {self.route.role} in this route, "
                f"only a {role} may {'send' if role == 'teacher' else 'recv'}"
            )
        return self.route.peers[self._count % len(self.route.peers)]

    def close(self) -> None:
        """Closes every channel (all are tried); raises the first error.

        A trainer whose stream ended (some teacher closed) first reads the end of the stream from
        its other teachers, whose ``close()`` waits for that; a trainer that stops before the end
        does not, and its teachers' ``close()`` raise ``ChannelTimeout`` (a stopped trainer is a failure).
        """
        first: BaseException | None = None
        ended = any(ch.peer_closed for ch in self.channels.values())
        for peer, channel in self.channels.items():
            try:
                if ended and not channel.peer_closed and not channel.closed:
                    try:
                        channel.recv()
                    except ChannelClosed:
                        pass
                    else:
                        raise ChannelError(
                            f"pipeline: rank {peer} sent a batch after the stream ended (teachers "
                            "must send equal numbers of batches); it was dropped"
                        )
                channel.close()
            except ChannelError as exc:
                first = first or exc
        if first is not None:
            raise first

    def __enter__(self) -> Router:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except ChannelError:
            if exc_type is None:
                raise
