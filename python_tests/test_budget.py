"""--time-budget's plan: the most teacher batches and steps that fit, and a clear refusal when none fit."""

import pytest

from torchspec_ext.training.budget import MARGIN, BudgetError, Costs, plan_run


def test_the_plan_fills_the_budget_with_whole_rounds():
    costs = Costs(spent=60.0, teacher_batch=2.0, step=1.0, evaluation=40.0)
    # 600 s - 60 - 40 = 500 s, of which 90% planned: 450 s; the 8 ready batches cost 8 * 3 steps = 24 s;
    # each more batch 2 + 3 = 5 s: 85 more, rounded down to whole rounds of 8: 80, so 88 batches, 264 steps.
    assert MARGIN == 0.9
    plan = plan_run(600.0, costs, epochs=3, round_batches=8, ready_batches=8, available_batches=1000)
    assert (plan.teacher_batches, plan.steps) == (88, 264)
    used = costs.spent + costs.evaluation + (88 - 8) * costs.teacher_batch + 264 * costs.step
    planned = costs.spent + costs.evaluation + 450.0
    assert used <= planned < used + 8 * (costs.teacher_batch + 3 * costs.step)  # one more round would not fit


def test_the_plan_stops_at_the_data_there_is():
    costs = Costs(spent=10.0, teacher_batch=1.0, step=1.0, evaluation=10.0)
    plan = plan_run(3600.0, costs, epochs=2, round_batches=1, ready_batches=1, available_batches=30)
    assert (plan.teacher_batches, plan.steps) == (30, 60)


def test_a_budget_for_fewer_steps_than_the_ready_batches_trains_what_fits():
    costs = Costs(spent=50.0, teacher_batch=1.0, step=2.0, evaluation=30.0)
    plan = plan_run(100.0, costs, epochs=3, round_batches=32, ready_batches=32, available_batches=500)
    assert (plan.teacher_batches, plan.steps) == (32, 9)  # 90% of the 20 s left


def test_a_budget_too_short_for_one_step_names_the_minimum():
    costs = Costs(spent=70.0, teacher_batch=1.0, step=2.0, evaluation=40.0)
    with pytest.raises(BudgetError, match="give at least 2 minutes"):
        plan_run(60.0, costs, epochs=3, round_batches=1, ready_batches=1, available_batches=10)


def test_bad_time_budgets_are_refused_before_anything_loads(capsys):
    from torchspec_ext import train

    for argv, message in (
        (["--time-budget", "0.5"], "--time-budget must be at least 1 (minutes)"),
        (["--time-budget", "5", "--max-steps", "10"], "give --max-steps or --time-budget, not both"),
        (["--time-budget", "5", "--cache-teacher", "x"], "single-process"),
    ):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert message in capsys.readouterr().err


def test_the_cpu_default_is_a_time_budget():
    from torchspec_ext import train
    from torchspec_ext.training.config import CPU_TIME_BUDGET

    assert train.parse_args(["--device", "cpu"]).time_budget == CPU_TIME_BUDGET
    assert train.parse_args(["--device", "cpu", "--max-steps", "7"]).time_budget is None
    assert train.parse_args(["--device", "cuda"]).time_budget is None


def test_a_time_budget_run_plans_its_steps_and_ends_in_time(tmp_path, capsys):
    """The whole --time-budget path on the tiny target: costs measured, a plan printed, then revised
    as the run measures its steps, the run ending within its minute (a little over, at most, on a
    loaded machine); resumed, it keeps the plan its checkpoint saved."""
    import json
    import re
    import time

    import torch

    from torchspec_ext import train

    from conftest import SMALL, save_tiny_chat_target, write_chat

    target = save_tiny_chat_target(tmp_path / "target", hidden_size=48, layers=6)
    data = write_chat(tmp_path / "chat.json")
    argv = ["--target", str(target), "--data", str(data), "--output-dir", str(tmp_path / "out"), *SMALL]
    begin = time.monotonic()
    assert train.main([*argv, "--device", "cpu", "--time-budget", "1"]) == 0
    assert time.monotonic() - begin < 90
    err = capsys.readouterr().err
    assert "--time-budget 1: " in err and "teacher batches" in err
    first_plan = int(re.search(r"(\d+) training steps", err).group(1))
    revised = [int(n) for n in re.findall(r"plan revised at step \d+: \d+ -> (\d+) steps", err)]
    final_plan = revised[-1] if revised else first_plan
    assert final_plan > first_plan  # the first costs include one-time ones: the minute holds more steps
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    ended = rows[-1]["step"]
    assert "final_eval_acceptance_length" in rows[-1] and 1 <= ended <= final_plan
    assert ended == final_plan or f"out of time at step {ended} of {final_plan}" in err
    checkpoint = tmp_path / "out" / "checkpoints" / (tmp_path / "out" / "checkpoints" / "latest").read_text().strip()
    saved = torch.load(checkpoint / "trainer.pt", weights_only=True)
    assert saved["step"] == ended and saved["plan"]["steps"] == final_plan
    # Resumed, the run keeps its plan (read from the checkpoint) instead of measuring again.
    assert train.main([*argv, "--device", "cpu", "--time-budget", "1", "--resume"]) == 0
    assert f"resuming the checkpoint's plan: {final_plan} steps" in capsys.readouterr().err
