"""The training loop of a trainer rank: steps, with the held-out check, the metrics line and the
checkpoint as the step's hooks; then the final draft and its evaluation. SIGINT and SIGTERM save the
step reached (or say what was saved) and exit with the signal's status."""

from __future__ import annotations

import dataclasses
import sys
import time

from torchspec_ext.training.checkpoints import FINAL_DRAFT, rng_state, save_checkpoint
from torchspec_ext.training.errors import Interrupted, StopSignals, TrainError
from torchspec_ext.training.metrics import Metrics, Progress, step_values
from torchspec_ext.training.roles import finish_job
from torchspec_ext.training.run import Run


class TrainingLoop:
    def __init__(self, run: Run):
        self.run, self.config = run, run.config
        self.lead = run.roles.is_lead_trainer
        self.step = run.start_step
        run.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics(run.output_dir, enabled=self.lead)
        self.progress = Progress(run.plan.steps, self.step, self.config.log_interval)
        self.logged_step = self.step  # the last step with a line in metrics.jsonl
        self.result = None
        self.saved = None  # (step, path) of the checkpoint this process wrote last
        self.signals = StopSignals()

    @property
    def plan(self):
        return self.run.plan

    def __call__(self) -> dict:
        """Trains to the plan's last step, then saves and evaluates the final draft; the run's summary."""
        summary = {"start_step": self.step}
        with self.signals:
            try:
                while self.step < self.plan.steps:
                    self.train_step()
                    values = self.step_values()
                    evaluation_s = self.held_out_check()
                    self.log(values, evaluation_s)
                    self.checkpoint()
                    summary["tokens_per_s"] = self.progress.tokens_per_s()
                    if self.out_of_time(evaluation_s):
                        break
                    self.signals.check()  # a signal stops the run here, between steps, never inside one
            except Interrupted as stop:
                self.stop(stop)
            self.progress.end()
            self.run.stream.close()
            summary["steps"] = self.step
            summary |= self.finish()
        self.metrics.close()
        run = self.run
        if run.roles.distributed:
            digest = finish_job(run.roles, run.draft.trained_state().values())
            summary.update(rank=run.roles.rank, role="trainer", draft_sha256=digest)
        return summary

    def train_step(self) -> None:
        run, m = self.run, len(self.run.roles.trainers)
        trainer_index = run.roles.trainers.index(run.roles.rank)
        batch = run.stream.batch(self.step * m + trainer_index)
        try:
            self.result = run.trainer.step(batch)
        except FloatingPointError:
            epoch = batch.batch_index // len(run.online.batches)
            raise TrainError(
                f"the loss is not finite at step {self.step + 1} (batch {batch.batch_index} of the data stream, "
                f"epoch {epoch}); stopped without saving it. The last checkpoint is intact: resume with a lower "
                "--lr or inspect that batch"
            ) from None
        self.step += 1
        if self.lead:
            self.progress.update(self.step, self.result)

    def held_out_check(self) -> float | None:
        """The periodic held-out check (lead trainer); its seconds, when it ran."""
        interval = self.config.eval_interval
        if not (self.lead and interval and self.step % interval == 0 and self.step < self.plan.steps):
            return None
        begin = time.monotonic()
        with self.signals.interruptible():
            self.found = self.run.heldout(self.run.draft)
        self.progress.end()
        print(
            f"[train] step {self.step}: held-out acceptance length {self.run.heldout.describe(self.found)}",
            file=sys.stderr,
        )
        return time.monotonic() - begin

    def step_values(self) -> dict:
        return {
            **step_values(self.result),
            "tokens_per_s": self.progress.tokens_per_s(),
            "lr": self.run.trainer.scheduler.get_last_lr()[0],
            "elapsed_s": time.monotonic() - self.run.started,
        }

    def log(self, values: dict, evaluation_s: float | None) -> None:
        """The step's line in metrics.jsonl, every --log-interval steps, at the last and with a check."""
        if evaluation_s is not None:
            values.update({f"eval_{k}": v for k, v in self.found.items()})
        if self.step % self.config.log_interval == 0 or self.step == self.plan.steps or evaluation_s is not None:
            self.metrics.log(self.step, values)
            self.logged_step = self.step

    def checkpoint(self) -> None:
        if self.lead and (self.step % self.config.save_interval == 0 or self.step == self.plan.steps):
            self.save()

    def save(self):
        run = self.run
        state = {
            "trainer": run.trainer.state_dict(),
            "plan": self.plan.state_dict(),
            "rng": rng_state(),
            "data_position": self.step * len(run.roles.trainers),  # where the teacher ranks resume
            "options": dataclasses.asdict(self.config),
        }
        path = save_checkpoint(run.output_dir, self.step, run.draft, state, self.config.keep_checkpoints)
        self.saved = (self.step, path)
        return path

    def out_of_time(self, evaluation_s: float | None) -> bool:
        """Under --time-budget: revises the plan with the costs measured so far; True when the time
        for training is spent (the plan's costs were too low)."""
        keeper = self.run.keeper
        if keeper is None:
            return False
        self.run.plan = keeper.step_done(self.step, evaluation_s)
        self.run.trainer.total_steps = self.plan.steps
        self.progress.total = self.plan.steps
        if time.monotonic() <= keeper.end_by:
            return False
        self.progress.end()
        print(
            f"[train] --time-budget {self.config.time_budget:g}: out of time at step {self.step} of {self.plan.steps}; "
            "ending here",
            file=sys.stderr,
        )
        if self.lead and self.step % self.config.save_interval:  # the last step's checkpoint, as a planned end has
            self.save()
        return True

    def stop(self, stop: Interrupted):
        """SIGINT / SIGTERM in the loop: the step reached is saved (its metrics line first), then exit."""
        self.progress.end()
        hint = f"continue with --resume --output-dir {self.run.output_dir}"
        if self.lead and self.step > 0:
            if self.step % self.config.log_interval == 0 and self.logged_step != self.step:
                self.metrics.log(
                    self.step, {"loss": self.result.loss, "elapsed_s": time.monotonic() - self.run.started}
                )
            saved = self.saved[1] if self.saved and self.saved[0] == self.step else self.save()
            print(f"\n[train] {stop.name} at step {self.step}: saved {saved}; {hint}", file=sys.stderr)
        else:
            print(f"\n[train] {stop.name} at step {self.step}: nothing to save; {hint}", file=sys.stderr)
        self.metrics.close()
        raise SystemExit(128 + stop.signum) from None

    def finish(self) -> dict:
        """The final draft, saved, then its held-out check (lead trainer). A signal during the check
        ends the run with what is saved named."""
        if not self.lead:
            return {}
        run, final = self.run, self.run.output_dir / FINAL_DRAFT
        run.draft.save(final)
        from torchspec_ext import atomic

        atomic.make_readable(final)
        try:
            with self.signals.interruptible():
                found = run.heldout(run.draft)
        except Interrupted as stop:
            print(
                f"\n[train] {stop.name} during the final evaluation: the draft of step {self.step} is saved in {final} "
                f"(and the checkpoint of step {self.step} in {run.output_dir / 'checkpoints'}); it was not evaluated",
                file=sys.stderr,
            )
            self.metrics.close()
            raise SystemExit(128 + stop.signum) from None
        self.metrics.log(self.step, {f"final_eval_{k}": v for k, v in found.items()})
        print(
            f"[train] done: {self.step} steps in {(time.monotonic() - run.started) / 60:.1f} min; held-out acceptance "
            f"length, greedy, {len(run.heldout.prompts)} prompts: {run.heldout.describe(found)}; draft in {final}",
            file=sys.stderr,
        )
        return {f"eval_{k}": v for k, v in found.items()}
