"""Where a trainer's batches come from. Every stream has ``next()`` (a teacher batch, see
teacher.py), ``position`` (batches of the data stream consumed, saved in checkpoints as
``data_position``) and ``close()``."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Protocol

from torch import Tensor

from torchspec_ext.teacher import Teacher
from torchspec_ext.training.batches import Batches, epoch_order
from torchspec_ext.training.errors import TrainError

REPLY_ROWS = 64  # --responses target: conversations decoded together (fewer cost more per token)


class BatchStream(Protocol):
    position: int

    def next(self) -> dict[str, Tensor]: ...

    def close(self) -> None: ...


class TeacherStream:
    """Online: the next token batch of ``batches`` through the target. With ``responses ==
    "target"``, the target's own greedy replies to the batches' first user turns instead of the
    data's replies: prompts of up to a quarter of ``--max-length`` tokens, replies of up to half;
    the batches of a round (``REPLY_ROWS`` conversations) are decoded together and handed out
    one by one, in any order."""

    def __init__(self, batches: Batches, teacher: Teacher, responses: str = "data", eos_ids=()):
        self.batches, self.teacher, self.responses, self.eos_ids = batches, teacher, responses, eos_ids
        self.round_batches = max(1, REPLY_ROWS // batches.batch_size) if responses == "target" else 1
        self.decoded: dict[int, dict[str, Tensor]] = {}  # position -> a batch made but not handed out yet

    @property
    def position(self) -> int:
        return self.batches.position

    @position.setter
    def position(self, value: int) -> None:
        self.batches.position = value

    def next(self) -> dict[str, Tensor]:
        position = self.batches.position
        self.prefetch(position)
        self.batches.position = position + 1
        return self.decoded.pop(position)

    def prefetch(self, position: int) -> None:
        """Makes the batches of the round holding ``position`` (unless made already)."""
        if position in self.decoded:
            return
        start = position - position % self.round_batches
        if self.responses == "data":
            self.batches.position = position
            index, ids, mask = self.batches.next()
            self.decoded[position] = self.teacher(ids, mask, index)
            return
        groups, indices = [], []
        for p in range(start, start + self.round_batches):
            self.batches.position = p
            index, prompts = self.batches.next_prompts(self.batches.max_length // 4)
            groups.append(prompts)
            indices.append(index)
        replies = self.teacher.generate(
            groups, self.batches.max_length // 2, indices, self.batches.pad_id, self.eos_ids
        )
        self.decoded.update(zip(range(start, start + self.round_batches), replies))

    def close(self) -> None:
        pass


class Passes:
    """``--epochs`` passes over ``count`` teacher batches, each pass in a seeded order (the same on
    every rank and on resume); ``fetch(i)`` gives batch ``i``. ``position`` counts the batches
    handed out over all passes."""

    def __init__(self, count: int, seed: int, fetch: Callable[[int], dict[str, Tensor]]):
        self.count, self.seed, self.fetch = count, seed, fetch
        self.position = 0

    def next(self) -> dict[str, Tensor]:
        epoch, i = divmod(self.position, self.count)
        self.position += 1
        return self.fetch(epoch_order(self.count, f"teacher-cache/{self.seed}/{epoch}")[i])

    def close(self) -> None:
        pass


def pass_length(batches_needed: int, epochs: int, available: int) -> int:
    """Teacher batches per pass: the run's batches spread over ``epochs`` passes (at most the ``available`` ones)."""
    return min(math.ceil(batches_needed / epochs), available)


def replayed_passes(online: TeacherStream, count: int, seed: int) -> Passes:
    """The passes over the first ``count`` batches of the online stream, each batch run through
    the target the first time it is needed and kept in CPU memory for the later passes."""
    kept: dict[int, dict[str, Tensor]] = {}

    def fetch(i: int) -> dict[str, Tensor]:
        if i not in kept:
            online.position = i
            kept[i] = {k: v.cpu() for k, v in online.next().items()}
        return {k: v.to(online.teacher.device) for k, v in kept[i].items()}

    return Passes(count, seed, fetch)


class RoutedStream:
    """A trainer rank's batches from the teacher ranks (pipeline Router). Trainer ``r`` of ``m``
    trains step ``s`` on global batch ``s * m + r``, so after any step every trainer has
    consumed the same ``position``."""

    def __init__(self, router, trainers: int):
        self.router, self.trainers = router, trainers
        self.position = 0

    def next(self) -> dict[str, Tensor]:
        from torchspec_ext.pipeline import ChannelClosed

        try:
            batch = self.router.recv()
        except ChannelClosed as exc:
            raise TrainError(f"a teacher rank ended its stream before this trainer's last step ({exc})") from exc
        self.position += self.trainers
        return batch

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
