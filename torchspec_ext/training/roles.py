"""The ranks of a torchrun job: teacher ranks run the target and send their batches to trainer
ranks, which train the draft data-parallel; the lead trainer writes checkpoints, metrics and the
draft. One process (WORLD_SIZE 1) is the lead trainer and there are no teacher ranks."""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import sys
from dataclasses import dataclass

import torch

from torchspec_ext.training.errors import TrainError


@dataclass
class RankRoles:
    """This process's part of the job. Under torchrun: ranks ``0..n-1`` are teachers, the rest
    trainers; batch ``g`` of teacher ``j`` (``g = k*n + j``) goes to trainer ``g % m``; the
    trainers train data-parallel (DDP over ``trainer_group``)."""

    rank: int = 0
    teachers: tuple[int, ...] = ()
    trainers: tuple[int, ...] = (0,)
    trainer_group: object = None
    shard_ranks: tuple[int, ...] = ()  # a teacher whose target is sharded (--teacher-shards): its group
    shard_group: object = None

    @property
    def distributed(self) -> bool:
        return bool(self.teachers)

    @property
    def is_teacher(self) -> bool:
        return self.rank in self.teachers

    @property
    def is_lead_trainer(self) -> bool:
        """The trainer that writes checkpoints, metrics and the draft, and evaluates."""
        return self.rank == self.trainers[0]

    def same_everywhere(self, what: str, digest: int, among: tuple[int, ...] | None = None) -> None:
        """A collective of every rank: raises TrainError unless the ranks ``among`` (default: all)
        computed the same ``digest`` of ``what``."""
        if not self.distributed:
            return
        import torch.distributed as dist

        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(len(self.teachers) + len(self.trainers))]
        dist.all_gather(gathered, torch.tensor([digest], dtype=torch.long))
        groups: dict[int, list[int]] = {}
        for rank in among or range(len(gathered)):
            groups.setdefault(int(gathered[rank]), []).append(rank)
        if len(groups) > 1:
            raise TrainError(f"the ranks disagree on the {what}: ranks {' vs '.join(map(str, groups.values()))}")


def tensor_digest(tensors) -> tuple[int, str]:
    """(int64, hex) SHA-256 of the tensors' bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.digest()
    return int.from_bytes(digest[:8], "little", signed=True), digest.hex()


def join_job(teacher_ranks: int, device: str, timeout: float, teacher_shards: int = 1) -> tuple[RankRoles, str]:
    """(this rank's roles, its device): joins the torchrun job when WORLD_SIZE > 1 (gloo on the
    CPU, NCCL for CUDA tensors); a CUDA rank takes the GPU of its LOCAL_RANK. With
    ``teacher_shards`` S > 1 the teacher ranks form groups of S consecutive ranks, each to hold
    one target sharded over it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return RankRoles(), device
    import torch.distributed as dist

    n = teacher_ranks
    if not n < world:
        raise TrainError(f"--teacher-ranks {n} leaves no trainer rank among WORLD_SIZE {world} ranks")
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    roles = RankRoles(dist.get_rank(), tuple(range(n)), tuple(range(n, world)))
    roles.trainer_group = dist.new_group(list(roles.trainers))  # every rank takes part in new_group
    if teacher_shards > 1:
        for first in range(0, n, teacher_shards):
            ranks = tuple(range(first, first + teacher_shards))
            group = dist.new_group(list(ranks))
            if roles.rank in ranks:
                roles.shard_ranks, roles.shard_group = ranks, group
    role = f"teacher {roles.rank + 1} of {n}" if roles.is_teacher else f"trainer {roles.rank - n + 1} of {world - n}"
    if roles.shard_ranks:
        role += f", holding 1/{teacher_shards} of the target with ranks {', '.join(map(str, roles.shard_ranks))}"
    print(f"[train] rank {roles.rank} of {world}: {role}", file=sys.stderr)
    return roles, device


def open_router(roles: RankRoles, timeout: float, device: str):
    from torchspec_ext.pipeline import Router

    return Router(roles.teachers, roles.trainers, timeout=timeout, device=torch.device(device))


def serve_batches(roles: RankRoles, stream, router, steps_left: int, start_position: int) -> dict:
    """A teacher rank: its share of the batches of the ``steps_left`` steps, sent to the trainers.

    The trainers take ``steps_left * m`` batches in all; every teacher sends the same number
    (``ceil`` of its share: the trainers drop the few beyond their last step), so the stream
    ends cleanly on every trainer."""
    n, m, j = len(roles.teachers), len(roles.trainers), roles.teachers.index(roles.rank)
    count = math.ceil(max(0, steps_left) * m / n)
    with router:
        for k in range(count):
            router.send(stream.batch(start_position + k * n + j).tensors())
    print(f"[train] rank {roles.rank}: sent {count} batches", file=sys.stderr)
    return {"rank": roles.rank, "role": "teacher", "batches_sent": count}


def finish_job(roles: RankRoles, draft_weights) -> str | None:
    """The last collective of the job: checks that every trainer holds the same draft weights
    (``draft_weights``: tensors; None on a teacher) and keeps the teachers, rank 0 holding the
    rendezvous store, up until the trainers are done. Returns the trainers' weights' SHA-256."""
    if not roles.distributed:
        return None
    import torch.distributed as dist

    digest, hex_digest = (0, None) if draft_weights is None else tensor_digest(draft_weights)
    roles.same_everywhere("draft weights at the end (DDP out of sync)", digest, among=roles.trainers)
    dist.destroy_process_group()
    return hex_digest
