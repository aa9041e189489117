"""Checkpoints in ``output_dir``: ``checkpoints/step-N`` (the draft as an EAGLE-3 directory plus
``trainer.pt``: optimiser, scheduler, data position, random states, options),
``checkpoints/latest`` naming the newest, and the final draft in ``draft/``. Each is written
whole or not at all, so an interrupted save never replaces the last good checkpoint."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

from torchspec_ext import atomic
from torchspec_ext.training.errors import TrainError

CHECKPOINTS, LATEST, FINAL_DRAFT, TRAINER_STATE = "checkpoints", "latest", "draft", "trainer.pt"


def save_checkpoint(output_dir: Path, trainer, data_position: int, step: int, options: dict, keep: int) -> Path:
    """Writes ``checkpoints/step-N``, points ``checkpoints/latest`` at it and keeps the newest ``keep``."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    with atomic.staged(final) as tmp:
        trainer.draft.save(tmp)
        torch.save(
            {
                "step": step,
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "data_position": data_position,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
                "args": options,
            },
            tmp / TRAINER_STATE,
        )
    atomic.write_text(root / LATEST, final.name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """The checkpoint ``--resume`` names: ``latest`` in ``output_dir``, or a checkpoint directory."""
    if resume != LATEST:
        path = Path(resume)
    else:
        pointer = output_dir / CHECKPOINTS / LATEST
        if not pointer.is_file():
            raise TrainError(f"--resume: no checkpoint in {output_dir / CHECKPOINTS} (train without --resume first)")
        path = output_dir / CHECKPOINTS / pointer.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise TrainError(f"--resume: {path} is not a checkpoint (no {TRAINER_STATE})")
    return path


def trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's ``trainer.pt``: step, data position, optimiser, scheduler, random states, options."""
    return torch.load(checkpoint / TRAINER_STATE, weights_only=False)


def restore(state: dict, trainer, stream) -> int:
    """Restores the trainer's state and the stream's data position from a :func:`trainer_state`;
    returns the step. The draft's weights were loaded from the same checkpoint when the draft was
    made (``Eagle3Draft.load``)."""
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    stream.position = state["data_position"]
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]
