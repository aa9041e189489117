"""``--learn``: the draft learns from the traffic it serves.

Each request's verified positions (:class:`~torchspec_ext.serve.engine.Verified`) become one row of a
:class:`~torchspec_ext.teacher.TeacherBatch`, as training's teacher makes them from the target's own
replies (:meth:`~torchspec_ext.teacher.Teacher.generate`): the sequence, the target's features at
every position, and the teacher's top-k at every position that predicts a reply token, mapped into
the draft's vocabulary. The rows go into a bounded :class:`ReplayBuffer`; a background thread
(:class:`Learner`) trains a float32 copy of the draft on batches of them with training's own
:class:`~torchspec_ext.training.trainer.DraftTrainer` and loss, hands its weights to the engine
every few steps (applied between requests, never inside one), and saves the draft in the export
layout periodically and on shutdown.
"""

from __future__ import annotations

import copy
import random
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from torchspec_ext import atomic, ops
from torchspec_ext.serve.engine import Verified
from torchspec_ext.serve.scheduler import own_threads
from torchspec_ext.teacher import TeacherBatch
from torchspec_ext.training.losses import kernels, loss_function
from torchspec_ext.training.trainer import DraftTrainer

LEARNED_DRAFT = "draft"  # output-dir/draft: the learned draft, in export's layout
LEARNER_STATE = "learner.pt"  # output-dir/learner.pt: the optimiser and counters, read with weights_only=True


@dataclass
class Row:
    """One request as a training row of ``n`` positions (TeacherBatch's fields without the batch axis)."""

    input_ids: Tensor  # [n] int64
    loss_mask: Tensor  # [n] bool: the reply tokens
    features: Tensor  # [n, F] float32 (the last position's is zero: no forward saw it)
    teacher_indices: Tensor  # [n, k] int64 draft ids, -1 where absent
    teacher_logprobs: Tensor  # [n, k] float32
    teacher_argmax: Tensor  # [n] int64 target ids, -1 where there is no teacher row
    trained: int = 0  # times it has been in a batch

    def __len__(self) -> int:
        return len(self.input_ids)


class SequenceRecorder:
    """Collects one request's :class:`Verified` positions (the engine's ``on_verified``) into a :class:`Row`.

    Positions ``0 .. N-2`` of the sequence ``x_0 .. x_{N-1}`` (prompt and reply) each arrive once:
    the prefill brings the prompt's but the last, each verification the root and the accepted nodes.
    The top-k is taken only from the last prompt token on (earlier rows predict prompt tokens, which
    no loss reads), with the same op and k as training's teacher."""

    def __init__(self, prompt: list[int], target_to_draft: Tensor, topk: int, max_length: int):
        self.prompt, self.topk, self.max_length = list(prompt), topk, max_length
        self.target_to_draft = target_to_draft
        self.tokens = list(prompt)
        self.features: list[Tensor] = []
        self.logprobs: list[Tensor] = []
        self.indices: list[Tensor] = []

    def __call__(self, v: Verified) -> None:
        if v.features is None:
            raise ValueError("learning needs a draft that reads the target's features")
        self.features.append(v.features.detach().float().cpu())
        if v.prefill:
            return
        self.tokens += v.tokens
        logprobs, indices, _ = ops.topk_logprobs(v.logits.detach().float(), self.topk)
        self.logprobs.append(logprobs.cpu())
        self.indices.append(indices.cpu())

    def row(self) -> Row | None:
        """The request's row (its last ``max_length`` positions), or None when it has no reply."""
        p, n = len(self.prompt), len(self.tokens)
        if n <= p or not self.logprobs:
            return None
        features = torch.cat(self.features)
        if len(features) != n - 1:
            raise RuntimeError(f"SequenceRecorder: {len(features)} feature rows for {n} tokens ({n - 1} expected)")
        features = torch.cat([features, features.new_zeros(1, features.shape[1])])
        k = self.topk
        indices, logprobs = torch.full((n, k), -1, dtype=torch.long), torch.zeros(n, k)
        argmax = torch.full((n,), -1, dtype=torch.long)
        top = torch.cat(self.indices)  # positions p-1 .. n-2
        indices[p - 1 : n - 1] = self.target_to_draft[top]
        logprobs[p - 1 : n - 1] = torch.cat(self.logprobs)
        argmax[p - 1 : n - 1] = top[:, 0]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[p:] = True
        keep = slice(max(0, n - self.max_length), n)
        ids = torch.tensor(self.tokens, dtype=torch.long)
        return Row(ids[keep], mask[keep], features[keep], indices[keep], logprobs[keep], argmax[keep])


class ReplayBuffer:
    """The newest rows, at most ``capacity`` positions in all (the oldest dropped first). A batch takes
    the rows never trained on first (oldest first), then rows drawn at random from the rest."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.rows: deque[Row] = deque()
        self.positions = 0
        self.added = 0
        self.lock = threading.Lock()
        self.rng = random.Random(seed)

    def add(self, row: Row) -> None:
        with self.lock:
            self.rows.append(row)
            self.positions += len(row)
            self.added += 1
            while self.positions > self.capacity and len(self.rows) > 1:
                self.positions -= len(self.rows.popleft())

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, size: int) -> list[Row]:
        with self.lock:
            fresh = [r for r in self.rows if r.trained == 0][:size]
            rest = [r for r in self.rows if r.trained > 0]
            chosen = fresh + self.rng.sample(rest, min(len(rest), size - len(fresh)))
            for r in chosen:
                r.trained += 1
            return chosen


def batch_of(rows: list[Row], index: int) -> TeacherBatch:
    """Rows right-padded to the longest (padding: id 0, no loss, zero features, no teacher)."""
    length = max(len(r) for r in rows)

    def stack(name: str, fill) -> Tensor:
        first = getattr(rows[0], name)
        out = torch.full((len(rows), length, *first.shape[1:]), fill, dtype=first.dtype)
        for i, r in enumerate(rows):
            out[i, : len(r)] = getattr(r, name)
        return out

    return TeacherBatch(
        input_ids=stack("input_ids", 0),
        loss_mask=stack("loss_mask", False),
        features=stack("features", 0.0),
        teacher_indices=stack("teacher_indices", -1),
        teacher_logprobs=stack("teacher_logprobs", 0.0),
        teacher_argmax=stack("teacher_argmax", -1),
        batch_index=index,
    ).checked("serve --learn")


@dataclass(frozen=True)
class LearnSettings:
    topk: int = 64  # the teacher's top-k, as training's default
    loss: str = "topk_kl"
    lr: float = 1e-3
    warmup_steps: int = 10
    batch_size: int = 2
    max_length: int = 512
    replay_positions: int = 65536
    passes: float = 3.0  # training steps per request = passes / batch_size: each request's row ~passes times
    swap_interval: int = 4  # steps between draft updates handed to the engine
    save_interval: float = 300.0  # seconds between checkpoints
    threads: int = 1  # torch threads of the training thread (its share of the cores)
    when: str = "shared"  # shared: train beside serving; idle: only while no request is running or waiting


class Learner:
    """The background trainer. ``publish(state, version)`` receives the trained tensors every
    ``swap_interval`` steps; ``busy()`` says whether a request is running or waiting."""

    def __init__(self, family, draft: torch.nn.Module, settings: LearnSettings, output_dir: Path, publish, busy):
        self.family, self.settings, self.output_dir = family, settings, Path(output_dir)
        self.publish, self.busy = publish, busy
        self.draft = copy.deepcopy(draft).float().cpu().train()  # the master copy: float32, this thread's
        self.target_to_draft = self.draft.target_to_draft().cpu()
        options = family.options({}).resolved(on_gpu=False)
        self.trainer = DraftTrainer(
            self.draft,
            options,
            loss=loss_function(settings.loss, kernels(False)),
            lr=settings.lr,
            warmup_steps=settings.warmup_steps,
            total_steps=10**9,  # constant after the warm-up: the traffic has no end
        )
        self.buffer = ReplayBuffer(settings.replay_positions)
        self.steps = 0
        self.requests = 0  # rows added
        self.versions = 0  # updates published
        self.last_loss = float("nan")
        self.last_accuracy = float("nan")
        self.train_seconds = 0.0
        self.saved_at = time.monotonic()
        self.errors = 0
        self._credit = 0.0  # steps allowed by the rows that came in
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._resume()

    # --- the serving side ------------------------------------------------------------------
    def recorder(self, prompt: list[int]) -> SequenceRecorder:
        return SequenceRecorder(prompt, self.target_to_draft, self.settings.topk, self.settings.max_length)

    def add(self, recorder: SequenceRecorder) -> None:
        row = recorder.row()
        if row is None or not bool(row.loss_mask.any()):
            return
        self.buffer.add(row)
        with self._wake:
            self.requests += 1
            self._credit += self.settings.passes / self.settings.batch_size
            self._wake.notify()

    # --- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="learner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread after its current step and saves the draft."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self.save()

    def _ready(self) -> bool:
        if self._credit < 1 or len(self.buffer) == 0:
            return False
        return self.settings.when == "shared" or not self.busy()

    def _run(self) -> None:
        own_threads(self.settings.threads)
        torch.set_flush_denormal(True)  # as training does: subnormal floats slow CPU steps ~1.6x
        while True:
            with self._wake:
                while not self._stop and not self._ready():
                    self._wake.wait(timeout=0.5)  # 'idle' mode polls busy()
                if self._stop:
                    return
                self._credit -= 1
            try:
                self.step()
            except Exception as exc:  # a failed step must not take serving down
                self.errors += 1
                print(f"[serve] learner: step {self.steps + 1} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            if time.monotonic() - self.saved_at >= self.settings.save_interval:
                self.save()

    def step(self) -> None:
        rows = self.buffer.sample(self.settings.batch_size)
        batch = batch_of(rows, self.steps)
        begin = time.perf_counter()
        result = self.trainer.step(batch)
        self.train_seconds += time.perf_counter() - begin
        self.steps += 1
        self.last_loss = result.loss
        self.last_accuracy = result.step_accuracies[0] if result.step_accuracies else float("nan")
        if self.steps % self.settings.swap_interval == 0:
            self.versions += 1
            self.publish({k: v.detach().clone() for k, v in self.draft.trained_state().items()}, self.versions)

    # --- checkpoints -----------------------------------------------------------------------
    def save(self) -> Path:
        """The draft in export's layout (float32: the trained weights exactly) in output-dir/draft,
        and the optimiser with the counters in output-dir/learner.pt; each written whole or not at all."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        final = self.output_dir / LEARNED_DRAFT
        with atomic.staged(final) as staging:
            self.draft.save(staging, torch.float32, private=False)
            atomic.make_readable(staging)
        state = {"trainer": self.trainer.state_dict(), "steps": self.steps, "requests": self.requests}
        with atomic.staged(self.output_dir / LEARNER_STATE) as staging:
            torch.save(state, staging)
        self.saved_at = time.monotonic()
        return final

    def _resume(self) -> None:
        path = self.output_dir / LEARNER_STATE
        if not path.is_file():
            return
        try:
            state = torch.load(path, weights_only=True)
            self.trainer.load_state_dict(state["trainer"])
        except Exception as exc:  # another draft's optimiser, or a damaged file: start the optimiser afresh
            print(f"[serve] learner: {path} not resumed ({type(exc).__name__}: {exc})", file=sys.stderr)
            return
        self.steps, self.requests = int(state["steps"]), int(state["requests"])
