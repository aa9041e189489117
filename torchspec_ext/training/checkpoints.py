"""Checkpoints in ``output_dir``: ``checkpoints/step-N`` (the draft's folder plus ``trainer.pt``, which
holds what the run's parts say their state is: the trainer's, the plan's, the random generators',
the options), ``checkpoints/latest`` naming the newest, and the final draft in ``draft/``. Each is
written whole or not at all, so an interrupted save never replaces the last good checkpoint.

``trainer.pt`` holds tensors and plain values only and is read with ``weights_only=True``: a
checkpoint from elsewhere cannot run code when it is resumed.
"""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import torch

from torchspec_ext import atomic
from torchspec_ext.training.errors import TrainError

CHECKPOINTS, LATEST, FINAL_DRAFT, TRAINER_STATE = "checkpoints", "latest", "draft", "trainer.pt"


def save_checkpoint(output_dir: Path, step: int, draft, state: dict, keep: int) -> Path:
    """Writes ``checkpoints/step-N`` (``draft`` and ``state``, which must be tensors and plain
    values), points ``checkpoints/latest`` at it and keeps the newest ``keep``."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    with atomic.staged(final) as tmp:
        draft.save(tmp)
        torch.save({"step": step, **state}, tmp / TRAINER_STATE)
        atomic.make_readable(tmp)
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


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's ``trainer.pt``, loaded with ``weights_only=True`` (a TrainError if it holds
    anything but tensors and plain values, or is damaged)."""
    path = checkpoint / TRAINER_STATE
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TrainError(
            f"--resume: {path} holds more than tensors and plain values, so it is not loaded (it could run code); "
            f"only checkpoints written by this version of torchspec_ext resume ({str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise TrainError(f"--resume: {path} is damaged ({exc}); resume from an earlier checkpoint") from None


def rng_state() -> dict:
    """The random generators' states (torch's, Python's, CUDA's), as plain values and tensors."""
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
