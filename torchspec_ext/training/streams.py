"""Where a trainer's batches come from. A stream hands out batch ``i`` of the run (``batch(i)``):
which batch that is depends only on ``i`` and the seed, so a resumed run asks for the batches an
uninterrupted one would have, and no stream keeps a position to save."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Protocol

from torchspec_ext.teacher import Teacher, TeacherBatch
from torchspec_ext.training.batches import Batches, epoch_order
from torchspec_ext.training.errors import TrainError

REPLY_ROWS = 64  # --responses target: conversations decoded together (fewer cost more per token)


class BatchStream(Protocol):
    def batch(self, i: int) -> TeacherBatch: ...

    def close(self) -> None: ...


class TeacherStream:
    """Online: token batch ``i`` of ``batches`` through the target. With ``responses == "target"``,
    the target's own greedy replies to the batches' first user turns instead of the data's
    replies: prompts of up to a quarter of ``--max-length`` tokens, replies of up to half; the
    batches of a round (``REPLY_ROWS`` conversations) are decoded together and kept until asked for."""

    def __init__(self, batches: Batches, teacher: Teacher, responses: str = "data", eos_ids=()):
        self.batches, self.teacher, self.responses, self.eos_ids = batches, teacher, responses, eos_ids
        self.round_batches = max(1, REPLY_ROWS // batches.batch_size) if responses == "target" else 1
        self._made: dict[int, TeacherBatch] = {}  # batches made (a round, or prepared) and not handed out yet

    def batch(self, i: int) -> TeacherBatch:
        self._make(i)
        return self._made.pop(i)

    def prepare(self, count: int) -> list[TeacherBatch]:
        """Makes batches ``0..count-1`` now (they are handed out later without running the target
        again) and returns them."""
        for i in range(count):
            self._make(i)
        return [self._made[i] for i in range(count)]

    def _make(self, i: int) -> None:
        if i in self._made:
            return
        if self.responses == "data":
            index, ids, mask = self.batches.tokens(i)
            self._made[i] = self.teacher(ids, mask, index)
            return
        start = i - i % self.round_batches
        positions = range(start, start + self.round_batches)
        groups = [self.batches.prompts(p, self.batches.max_length // 4) for p in positions]
        replies = self.teacher.generate(
            [prompts for _, prompts in groups],
            self.batches.max_length // 2,
            [index for index, _ in groups],
            self.batches.pad_id,
            self.eos_ids,
        )
        self._made.update(zip(positions, replies))

    def close(self) -> None:
        pass


class Passes:
    """Passes over ``count`` teacher batches, each pass in a seeded order (the same on every rank
    and on resume); ``fetch(j)`` gives teacher batch ``j``, and batch ``i`` of the run is batch
    ``i % count`` of pass ``i // count``'s order. There are as many passes as the run asks for."""

    def __init__(self, count: int, seed: int, fetch: Callable[[int], TeacherBatch]):
        self.count, self.seed, self.fetch = count, seed, fetch

    def batch(self, i: int) -> TeacherBatch:
        epoch, j = divmod(i, self.count)
        return self.fetch(epoch_order(self.count, f"teacher-cache/{self.seed}/{epoch}")[j])

    def close(self) -> None:
        pass


def pass_length(batches_needed: int, epochs: int, available: int) -> int:
    """Teacher batches per pass: the run's batches spread over ``epochs`` passes (at most the ``available`` ones)."""
    return min(math.ceil(batches_needed / epochs), available)


def replayed_passes(online: TeacherStream, count: int, seed: int) -> Passes:
    """The passes over the first ``count`` batches of the online stream, each batch run through
    the target the first time it is needed and kept in CPU memory for the later passes."""
    kept: dict[int, TeacherBatch] = {}

    def fetch(j: int) -> TeacherBatch:
        if j not in kept:
            kept[j] = online.batch(j).to("cpu")
        return kept[j].to(online.teacher.device)

    return Passes(count, seed, fetch)


class RoutedStream:
    """A trainer rank's batches from the teacher ranks (pipeline Router), in the order of the run:
    trainer ``r`` of ``m`` trains step ``s`` on global batch ``s * m + r``, which the router delivers
    in turn (so ``batch`` must be asked for consecutive steps)."""

    def __init__(self, router, trainers: int, first_step: int):
        self.router, self.trainers = router, trainers
        self.next_step = first_step

    def batch(self, i: int) -> TeacherBatch:
        from torchspec_ext.pipeline import ChannelClosed

        step = i // self.trainers
        if step != self.next_step:  # the router is a queue: it cannot skip or go back
            raise RuntimeError(f"RoutedStream: asked for step {step}'s batch, the next one is step {self.next_step}'s")
        try:
            tensors = self.router.recv()
        except ChannelClosed as exc:
            raise TrainError(f"a teacher rank ended its stream before this trainer's last step ({exc})") from exc
        self.next_step += 1
        return TeacherBatch.from_tensors(tensors, f"the batch of step {step + 1} from the teacher ranks")

    def close(self) -> None:
        """Reads (and drops) the batches the teachers made beyond the last step, then the end of
        the stream: the teachers' close() waits for that."""
        dropped = sum(1 for _ in self.router)
        self.router.close()
        if dropped:
            print(
                f"[train] rank {self.router.route.rank}: dropped {dropped} batch(es) beyond the last step "
                "(teachers send equal numbers)",
                file=sys.stderr,
            )
