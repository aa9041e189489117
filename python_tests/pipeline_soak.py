"""How a channel ends, over and over: a teacher and a trainer in two gloo processes that exit the
way a user's script does (the interpreter's own teardown, no ``os._exit``), or are killed mid-stream.

``python python_tests/pipeline_soak.py [RUNS]`` runs every scenario RUNS times (default 20) and
prints the failures of each; test_pipeline.py runs a few of each (``TORCHSPEC_SOAK_RUNS``, default 2).

Scenarios (60 batches through ``TensorChannel(depth=2, timeout=20)``, each side in a ``with``):

- ``healthy``: the teacher sends 60 and closes; the trainer takes exactly 60 (it never asks for
  the end of the stream) and leaves. Neither may raise.
- ``teacher_closes_late``: the same, but the teacher calls close() a while after its last send
  (``LATE_CLOSE_S``), so that its end of the stream arrives as the trainer closes, as its
  process exits, or after that.
- ``teacher_leaves_first``: the same, but the trainer takes its last two batches only after the
  teacher's process is gone.
- ``teacher_killed``: the teacher dies (``os._exit``) after its 5th send; the trainer gets the
  batches that left it, in order, then a ``ChannelError`` (not ``ChannelClosed``).
- ``trainer_killed``: the trainer dies after taking 5 batches; the teacher's send or close raises
  ``ChannelError`` within its timeout.

Every process must end with exit code 0 (a killed one with ``KILLED``), none may print
``terminate called`` or die of a signal, every batch must arrive bit for bit and in order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCHES, KILL_AFTER, DEPTH, TIMEOUT = 60, 5, 2, 20.0
KILLED = 3  # the exit code of a process killed on purpose
SCENARIOS = ("healthy", "teacher_closes_late", "teacher_leaves_first", "teacher_killed", "trainer_killed")
# How long the teacher of run i of "teacher_closes_late" waits before its close(), cycling: while the
# trainer closes, while its process exits, after it is gone.
LATE_CLOSE_S = (0.25, 0.75, 1.5, 3.0)
_HERE = Path(__file__).resolve().parent


def _wait_for(path: Path, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {limit} s")
        time.sleep(0.01)


def _teacher(scenario: str, ch, flags: Path, run_index: int) -> dict:
    from torchspec_ext.pipeline import ChannelError

    from pipeline_workers import teacher_batch

    sent, t0 = 0, time.monotonic()
    try:
        for s in range(BATCHES):
            ch.send(teacher_batch(s))
            sent += 1
            if scenario == "teacher_killed" and sent == KILL_AFTER:
                os._exit(KILLED)
        if scenario == "teacher_closes_late":
            time.sleep(LATE_CLOSE_S[run_index % len(LATE_CLOSE_S)])
        ch.close()
    except ChannelError as exc:
        return {"sent": sent, "error": type(exc).__name__, "message": str(exc), "elapsed": time.monotonic() - t0}
    return {"sent": sent, "error": None}


def _trainer(scenario: str, ch, flags: Path, run_index: int) -> dict:
    from torchspec_ext.pipeline import ChannelClosed, ChannelError

    from pipeline_workers import assert_same_batch, teacher_batch

    received, t0 = 0, time.monotonic()
    try:
        for s in range(BATCHES):
            if scenario == "teacher_leaves_first" and s == BATCHES - DEPTH:
                _wait_for(flags / "teacher_gone")
            batch = ch.recv()
            assert_same_batch(batch, teacher_batch(s), f"batch {s}")
            received += 1
            if scenario == "trainer_killed" and received == KILL_AFTER:
                os._exit(KILLED)
            if scenario == "teacher_killed":
                t0 = time.monotonic()  # the time to notice is counted from the last batch
    except ChannelError as exc:
        closed = isinstance(exc, ChannelClosed)
        return {
            "received": received,
            "error": type(exc).__name__,
            "message": str(exc),
            "closed": closed,
            "elapsed": time.monotonic() - t0,
        }
    return {"received": received, "error": None}


def worker(scenario: str, rank: int, run_dir: str, run_index: int) -> None:
    """One side of a run, in its own process; prints its result as the last line ``RESULT {json}``."""
    import datetime

    import torch
    import torch.distributed as dist

    from torchspec_ext.pipeline import TensorChannel

    run = Path(run_dir)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(str(run / "store"), 2),
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    with TensorChannel(1 - rank, depth=DEPTH, timeout=TIMEOUT) as ch:
        result = (_teacher if rank == 0 else _trainer)(scenario, ch, run, run_index)
    print("RESULT " + json.dumps(result), flush=True)


def run_once(scenario: str, run_index: int = 0, limit: float = 300.0) -> list[str]:
    """Runs ``scenario`` once; returns what went wrong (nothing when all is well)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_HERE), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory(prefix="soak-") as run_dir:
        run = Path(run_dir)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(_HERE / "pipeline_soak.py"),
                    "--worker",
                    scenario,
                    str(rank),
                    run_dir,
                    str(run_index),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for rank in (0, 1)
        ]
        deadline = time.monotonic() + limit
        outputs, problems = [None, None], []
        if scenario == "teacher_leaves_first":  # tell the trainer once the teacher's process is gone
            try:
                outputs[0] = procs[0].communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                pass
            (run / "teacher_gone").touch()
        for rank, p in enumerate(procs):
            try:
                if outputs[rank] is None:
                    outputs[rank] = p.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                p.kill()
                outputs[rank] = p.communicate()
                problems.append(f"rank {rank} hung (killed after {limit:g} s)")
        results = [
            _check_process(rank, p.returncode, *outputs[rank], scenario, problems) for rank, p in enumerate(procs)
        ]
    _check_results(scenario, *results, problems)
    return problems


def _check_process(rank: int, code: int, out: str, err: str, scenario: str, problems: list[str]):
    killed = (scenario, rank) in (("teacher_killed", 0), ("trainer_killed", 1))
    text = out + err
    tail = "\n    ".join(text.strip().splitlines()[-8:])
    if code != (KILLED if killed else 0):
        problems.append(f"rank {rank} exit code {code}:\n    {tail}")
    elif "terminate called" in text or "Aborted" in text or "Traceback" in text:
        problems.append(f"rank {rank} printed an abort or a traceback:\n    {tail}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if killed:
        return None
    if not lines:
        problems.append(f"rank {rank} reported no result:\n    {tail}")
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def _check_results(scenario: str, teacher, trainer, problems: list[str]) -> None:
    if scenario in ("healthy", "teacher_closes_late", "teacher_leaves_first"):
        if teacher is not None and (teacher["error"] or teacher["sent"] != BATCHES):
            problems.append(f"teacher: {teacher}")
        if trainer is not None and (trainer["error"] or trainer["received"] != BATCHES):
            problems.append(f"trainer: {trainer}")
    elif scenario == "teacher_killed" and trainer is not None:
        # Batches still in the dead sender's queue are lost (up to depth); the rest arrive.
        if trainer["error"] is None or trainer["closed"] or not KILL_AFTER - DEPTH <= trainer["received"] <= KILL_AFTER:
            problems.append(f"trainer: {trainer}")
        elif "differs" in trainer["message"] or trainer["elapsed"] > TIMEOUT:
            problems.append(f"trainer: {trainer}")
    elif scenario == "trainer_killed" and teacher is not None:
        if teacher["error"] is None or teacher["error"] == "ChannelClosed" or teacher["elapsed"] > TIMEOUT + 5:
            problems.append(f"teacher: {teacher}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        worker(argv[1], int(argv[2]), argv[3], int(argv[4]))
        return 0
    runs = int(argv[0]) if argv else 20
    scenarios = argv[1:] or SCENARIOS
    failed = 0
    for scenario in scenarios:
        failures = 0
        for i in range(runs):
            problems = run_once(scenario, i)
            if problems:
                failures += 1
                print(f"{scenario} run {i}: " + "\n  ".join(problems), flush=True)
        print(f"{scenario}: {failures} of {runs} runs failed", flush=True)
        failed += failures
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
