"""Training layouts of torchspec_ext.train on a tiny random target, on the CPU: the disaggregated
torchrun layout (teacher ranks -> trainer ranks over gloo), the --cache-teacher cache, and a
dead teacher rank failing the job instead of hanging it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torchspec_ext import train as train_mod
from torchspec_ext.training.roles import tensor_digest

from conftest import save_tiny_chat_target

REPO = Path(__file__).resolve().parents[1]

TOPICS = [
    "the sea",
    "a red kite",
    "bread",
    "trains",
    "the moon",
    "a garden",
    "chess",
    "rain",
    "tea",
    "a bridge",
    "owls",
    "winter",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(target dir, data file): a random 4-layer Llama with the default target's tokenizer, and 12
    short chats."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_chat_target(root / "target", hidden_size=32, layers=4, tie_word_embeddings=True)
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Tell me about {t}."},
                {"role": "assistant", "content": f"Here is a short note about {t}: it is {t}, as ever."},
            ]
        }
        for t in TOPICS
    ]
    (root / "chats.json").write_text(json.dumps(chats))
    return root / "target", root / "chats.json"


SMALL = (
    "--batch-size 2 --max-length 64 --ttt-steps 2 --topk 8 --draft-vocab 256 --vocab-sample 50 --held-out 0.2 "
    "--eval-interval 0 --eval-prompts 1 --eval-new-tokens 4 --eval-depth 2 --log-interval 1 --warmup-steps 1 "
    "--device cpu --target-dtype float32"
).split()


def options(tiny, out, steps=3, *extra) -> list[str]:
    target, data = tiny
    return [
        "--target",
        str(target),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        str(steps),
        *SMALL,
        *extra,
    ]


def losses(out: Path) -> list[float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


# ------------------------------------------------------------------------------ torchrun layout
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int, logs: Path) -> list[subprocess.Popen]:
    """What torchrun does for one node: ``world`` processes with RANK/WORLD_SIZE/MASTER_* set,
    each with its own stdout/stderr file in ``logs``."""
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME="lo",
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(REPO),
        )
        with open(logs / f"{rank}.out", "w") as stdout, open(logs / f"{rank}.err", "w") as stderr:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "torchspec_ext.train", *args],
                    env=env,
                    cwd=REPO,
                    stdout=stdout,
                    stderr=stderr,
                )
            )
    return procs


def wait_all(procs, logs: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job did not finish within {timeout} s:\n{tails(logs, len(procs))}") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]


def tails(logs: Path, world: int) -> str:
    return "\n".join(f"--- rank {r} ---\n" + (logs / f"{r}.err").read_text()[-3000:] for r in range(world))


def summaries(logs: Path, world: int) -> list[dict]:
    return [json.loads((logs / f"{r}.out").read_text().strip().splitlines()[-1]) for r in range(world)]


@pytest.mark.parametrize("teachers, trainers", [(1, 2), (2, 1)])
def test_disaggregated_layout(tiny, tmp_path, teachers, trainers):
    world = teachers + trainers
    out, logs = tmp_path / "out", tmp_path / "logs"

    def run(out_dir, log_dir, *extra):
        args = options(tiny, out_dir, 3, "--teacher-ranks", str(teachers), "--dist-timeout", "60", *extra)
        return wait_all(launch(args, world, log_dir), log_dir, timeout=240)

    codes = run(out, logs, "--save-interval", "1", "--keep-checkpoints", "3")
    assert codes == [0] * world, tails(logs, world)
    got = summaries(logs, world)
    assert [s["role"] for s in got] == ["teacher"] * teachers + ["trainer"] * trainers
    # 3 steps x m trainers, in equal shares per teacher (2 teachers -> 1 trainer: one spare batch, dropped).
    assert [s["batches_sent"] for s in got[:teachers]] == [-(-3 * trainers // teachers)] * teachers
    assert all(s["steps"] == 3 for s in got[teachers:])
    assert len({s["draft_sha256"] for s in got[teachers:]}) == 1  # DDP kept the trainers identical
    assert (out / "draft" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    state = torch.load(out / "checkpoints" / "step-00000003" / "trainer.pt", weights_only=False)
    assert state["data_position"] == 3 * trainers
    assert len(losses(out)) == 3 and "eval_acceptance_length" in got[teachers]

    # The written draft is the one every trainer held.
    from torchspec_ext.drafts.eagle3 import Eagle3Draft
    from torchspec_ext.target import load_target

    saved = Eagle3Draft.load(out / "draft", load_target(tiny[0])[0])
    assert tensor_digest(saved.trained_state().values())[1] == got[teachers]["draft_sha256"]

    if teachers == 2:  # resumed, the teachers start at the checkpoint's data position: the same last step
        resumed, logs2 = tmp_path / "resumed", tmp_path / "logs2"
        codes = run(resumed, logs2, "--resume", str(out / "checkpoints" / "step-00000002"))
        assert codes == [0] * world, tails(logs2, world)
        assert losses(resumed) == losses(out)[2:]


def test_dead_teacher_fails_the_job(tiny, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    procs = launch(options(tiny, out, 200, "--teacher-ranks", "1", "--dist-timeout", "30"), 3, logs)
    deadline = time.monotonic() + 120
    while "step 2/" not in (logs / "1.err").read_text():  # training under way
        assert time.monotonic() < deadline and procs[1].poll() is None, tails(logs, 3)
        time.sleep(0.2)
    procs[0].send_signal(signal.SIGKILL)
    codes = wait_all(procs, logs, timeout=90)
    assert codes[1] != 0 and codes[2] != 0
    # The trainer that notices first names the dead teacher; the other may instead fail in DDP's
    # collective once that trainer is gone (torchrun then reports the first failure).
    errors = [(logs / f"{rank}.err").read_text() for rank in (1, 2)]
    assert any("pipeline: receiving batch" in e and "from rank 0" in e for e in errors), tails(logs, 3)


# ------------------------------------------------------------------------------ teacher cache
def test_teacher_batches_run_once_then_replayed_from_cache_or_memory(tiny, tmp_path, monkeypatch):
    from torchspec_ext import teacher as teacher_mod

    calls = []
    real = teacher_mod.Teacher.__call__
    monkeypatch.setattr(teacher_mod.Teacher, "__call__", lambda self, *a: calls.append(a[2]) or real(self, *a))
    cache = tmp_path / "cache"
    # 4 steps over 2 epochs: 2 batches cached, each trained on twice.
    run = lambda out, *extra: train_mod.main(
        options(tiny, tmp_path / out, 4, "--cache-teacher", str(cache), "--epochs", "2", *extra)
    )
    assert run("a", "--save-interval", "1", "--keep-checkpoints", "4") == 0
    assert calls == [0, 1]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["count"] == 2 and manifest["topk"] == 8 and len(manifest["draft_vocab"]) == 256
    assert sorted(p.name for p in cache.glob("*.safetensors")) == manifest["files"]

    calls.clear()
    assert run("b") == 0
    assert calls == []  # trained from the cache: the target ran for evaluation only
    assert len(losses(tmp_path / "a")) == 4 and losses(tmp_path / "a") == losses(tmp_path / "b")

    # A resumed run continues at the checkpoint's position in the cached stream: the same losses.
    assert run("c", "--resume", str(tmp_path / "a" / "checkpoints" / "step-00000002")) == 0
    assert calls == [] and losses(tmp_path / "c") == losses(tmp_path / "a")[2:]

    # Without a cache, --epochs keeps the teacher's batches in memory: each is run through the
    # target once and replayed in the same order as from the cache, so the losses are the same.
    online = lambda out, *extra: train_mod.main(options(tiny, tmp_path / out, 4, "--epochs", "2", *extra))
    assert online("d", "--save-interval", "1", "--keep-checkpoints", "4") == 0
    assert sorted(calls) == [0, 1] and losses(tmp_path / "d") == losses(tmp_path / "a")
    # A resumed run (in the second pass) runs the teacher again for the batches it replays.
    calls.clear()
    assert online("e", "--resume", str(tmp_path / "d" / "checkpoints" / "step-00000003")) == 0
    assert len(calls) == 1 and losses(tmp_path / "e") == losses(tmp_path / "a")[3:]


def test_teacher_cache_of_another_run_is_refused(tiny, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert train_mod.main(options(tiny, tmp_path / "a", 1, "--cache-teacher", str(cache))) == 0
    assert train_mod.main(options(tiny, tmp_path / "b", 1, "--cache-teacher", str(cache), "--topk", "4")) == 2
    assert "another topk" in capsys.readouterr().err


# ------------------------------------------------------------------------------ sharded teacher
def test_a_target_sharded_over_two_teacher_ranks_trains_as_one_process(tiny, tmp_path):
    """--teacher-shards 2: ranks 0 and 1 hold one target between them (FSDP2 over gloo), half of
    its weights each, and each sends its share of the batches; the trainer's per-step losses are
    the single-process run's (to 1e-4: the processes run one thread, the test two)."""
    single = tmp_path / "single"
    assert train_mod.main(options(tiny, single, 4)) == 0
    out, logs = tmp_path / "out", tmp_path / "logs"
    args = options(tiny, out, 4, "--teacher-ranks", "2", "--teacher-shards", "2", "--dist-timeout", "60")
    codes = wait_all(launch(args, 3, logs), logs, timeout=240)
    assert codes == [0, 0, 0], tails(logs, 3)
    got = summaries(logs, 3)
    assert [s["role"] for s in got] == ["teacher", "teacher", "trainer"]
    for s in got[:2]:  # half of every weight, the last shard of an odd size a row short
        assert s["weights_held_mib"] == pytest.approx(s["weights_mib"] / 2, rel=0.01)
    assert "holds" in (logs / "0.err").read_text() and "sharded over ranks 0, 1" in (logs / "1.err").read_text()
    assert losses(out) == pytest.approx(losses(single), rel=1e-4)


def test_shard_counts_that_cannot_work_are_refused_up_front(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit):
        train_mod.parse_args(["--device", "cpu", "--max-steps", "1", "--teacher-ranks", "3", "--teacher-shards", "2"])
    assert "with 3 teacher ranks it can be 1, 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_mod.parse_args(
            ["--max-steps", "1", "--teacher-ranks", "2", "--teacher-shards", "2", "--responses", "target"]
        )
    assert "--responses data" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit):
        train_mod.parse_args(["--device", "cpu", "--teacher-shards", "2"])
    assert "runs under torchrun" in capsys.readouterr().err


def test_a_dead_shard_fails_the_job(tiny, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    args = options(tiny, out, 200, "--teacher-ranks", "2", "--teacher-shards", "2", "--dist-timeout", "30")
    procs = launch(args, 3, logs)
    deadline = time.monotonic() + 120
    while "step 2/" not in (logs / "2.err").read_text():  # training under way
        assert time.monotonic() < deadline and procs[2].poll() is None, tails(logs, 3)
        time.sleep(0.2)
    begin = time.monotonic()
    procs[1].send_signal(signal.SIGKILL)
    codes = wait_all(procs, logs, timeout=90)
    assert codes[0] != 0 and codes[2] != 0 and time.monotonic() - begin < 60
    errors = {rank: (logs / f"{rank}.err").read_text() for rank in (0, 2)}
    # The shard's partner names its group; the trainer names whichever teacher it was waiting on.
    assert "the group of ranks 0, 1 holding the target failed" in errors[0] or "from rank 1" in errors[2], tails(
        logs, 3
    )


def test_a_truncated_shard_file_fails_every_rank_naming_it(tiny, tmp_path):
    """Every rank checks the checkpoint's files before reading any (the teachers read slices of
    each, the trainers the embedding): all stop, each naming the truncated file."""
    from transformers import AutoModelForCausalLM

    target = tmp_path / "target"
    AutoModelForCausalLM.from_pretrained(tiny[0]).save_pretrained(target, max_shard_size="2MB")
    for f in tiny[0].iterdir():
        if f.suffix != ".safetensors" and not (target / f.name).exists():
            (target / f.name).write_bytes(f.read_bytes())  # the tokenizer
    files = sorted(target.glob("*.safetensors"))
    assert len(files) > 1
    victim = files[-1]
    victim.write_bytes(victim.read_bytes()[:-4096])
    out, logs = tmp_path / "out", tmp_path / "logs"
    args = options((target, tiny[1]), out, 2, "--teacher-ranks", "2", "--teacher-shards", "2", "--dist-timeout", "30")
    codes = wait_all(launch(args, 3, logs), logs, timeout=120)
    assert codes == [2, 2, 2], tails(logs, 3)
    for rank in range(3):
        error = (logs / f"{rank}.err").read_text()
        assert f"cannot load the target: {victim} cannot be read" in error and "truncated" in error, tails(logs, 3)
