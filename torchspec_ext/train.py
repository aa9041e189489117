"""``python -m torchspec_ext.train``: train a draft model online against a target model.

With no arguments: the embedded default target (SmolLM2-135M-Instruct) and ShareGPT data, on the
CPU, in about 15 minutes on 2 cores; an EAGLE-3 draft (``--draft-family`` picks another family)
lands in ``--output-dir``/draft, the layout SGLang and vLLM load. Each batch goes through the teacher
(the target: the hidden states the draft reads and its top-k next-token log-probabilities), then
the draft family's objective trains the draft on it with the fused loss.

Under ``torchrun --nproc-per-node N -m torchspec_ext.train --teacher-ranks n``, ranks ``0..n-1``
run the target and send their batches (torchspec_ext.pipeline) to the other ranks, which train the
draft data-parallel; the first trainer writes checkpoints, metrics and the draft (see ``training.roles``);
``--teacher-shards S`` makes the teacher ranks groups of S, each holding one target sharded over it.
``--epochs E`` runs the target over max-steps / E batches once and replays them E times (kept in
memory); ``--cache-teacher DIR`` stores them in DIR instead, for this run and later ones.

Every flag can also come from a JSON or TOML ``--config`` file (keys are the flag names with
underscores); flags given on the command line win.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback

import torch

from torchspec_ext.pipeline import ChannelError
from torchspec_ext.training.config import TrainConfig
from torchspec_ext.training.config import parse_args as _parse_args
from torchspec_ext.training.errors import TrainError
from torchspec_ext.training.loop import TrainingLoop
from torchspec_ext.training.roles import finish_job, open_router, serve_batches
from torchspec_ext.training.run import Run, build_run


def parse_args(argv=None) -> TrainConfig:
    return _parse_args(argv, __doc__)


def serve_as_teacher(run: Run) -> dict:
    """A teacher rank's whole job: its share of the batches of the steps after the one resumed
    from, then the job's end."""
    roles = run.roles
    router = open_router(roles, run.config.dist_timeout, run.device)
    position = run.start_step * len(roles.trainers)
    try:
        summary = serve_batches(roles, run.stream, router, run.plan.steps - run.start_step, position)
    except RuntimeError as exc:  # a collective of the shard group (gloo / NCCL) failed
        if not roles.shard_ranks or isinstance(exc, ChannelError):
            raise
        ranks = ", ".join(map(str, roles.shard_ranks))
        raise ChannelError(
            f"the group of ranks {ranks} holding the target failed: one of them died or stopped "
            f"({str(exc).splitlines()[0]})"
        ) from exc
    finish_job(roles, None)
    return summary | run.sharded


@contextlib.contextmanager
def subnormals_flushed():
    """Subnormal floats appear in the draft's training after some tens of steps and make each CPU
    step after them up to 1.6x slower; flushed to zero they cost nothing (this sets the CPU's flags)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # torch's default, for the rest of the caller's process


def train(config: TrainConfig) -> dict:
    with subnormals_flushed():
        run = build_run(config)
        return serve_as_teacher(run) if run.roles.is_teacher else TrainingLoop(run)()


def main(argv=None) -> int:
    config = parse_args(argv)
    try:
        summary = train(config)
    except (TrainError, ChannelError) as exc:  # ChannelError: a peer rank failed, stopped or timed out
        where = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"torchspec_ext.train: error: {where}{exc}", file=sys.stderr)
        _exit_if_distributed(2 if isinstance(exc, TrainError) else 1)
        return 2 if isinstance(exc, TrainError) else 1
    except KeyboardInterrupt:  # outside the training loop (which saves and exits itself): loading
        print("\ntorchspec_ext.train: interrupted", file=sys.stderr)
        _exit_if_distributed(130)
        return 130
    except BaseException as exc:
        if not isinstance(exc, SystemExit):
            traceback.print_exc()
        _exit_if_distributed(exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1)
        raise
    print(json.dumps(summary))
    return 0


def _exit_if_distributed(status: int) -> None:
    """A failed rank of a torchrun job exits at once: tearing its process group down could wait
    for a peer that is gone, and torchrun stops the other ranks when one exits with an error."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
