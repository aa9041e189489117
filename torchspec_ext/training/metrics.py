"""What a run reports: metrics.jsonl and TensorBoard in the output directory, and the progress line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from torchspec_ext.training.trainer import StepResult


class Metrics:
    """metrics.jsonl and TensorBoard (when the tensorboard package is installed) in output_dir."""

    def __init__(self, output_dir: Path, enabled: bool = True):
        self.file = open(output_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                print("[train] tensorboard is not installed: metrics go to metrics.jsonl only", file=sys.stderr)

    def log(self, step: int, values: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def step_values(result: StepResult) -> dict:
    """A step's line in metrics.jsonl: its loss, acceptance estimate and per-unroll-step losses and accuracies."""
    values = {"loss": result.loss, "acceptance_estimate": result.acceptance_estimate}
    for s, (loss, acc) in enumerate(zip(result.step_losses, result.step_accuracies)):
        values[f"loss_step{s}"], values[f"accuracy_step{s}"] = loss, acc
    return values


class Progress:
    """One status line: step, loss, acceptance estimate, tokens/s, ETA (redrawn on a terminal,
    a line every ``interval`` steps otherwise)."""

    def __init__(self, total: int, start: int, interval: int):
        self.total, self.start, self.interval = total, start, interval
        self.begin = time.perf_counter()
        self.tokens = 0
        self.tty = sys.stderr.isatty()

    def update(self, step: int, result: StepResult) -> None:
        self.tokens += result.tokens
        elapsed = time.perf_counter() - self.begin
        done = step - self.start
        eta = elapsed / max(done, 1) * (self.total - step)
        line = (
            f"[train] step {step}/{self.total} loss {result.loss:.3f} acc {result.step_accuracies[0]:.2f} "
            f"accept~{result.acceptance_estimate:.2f} {self.tokens / max(elapsed, 1e-9):.0f} tok/s "
            f"ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        if self.tty:
            print("\r" + line.ljust(100), end="", file=sys.stderr, flush=True)
        elif step % self.interval == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.begin, 1e-9)

    def end(self) -> None:
        if self.tty:
            print(file=sys.stderr)
