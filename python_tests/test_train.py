"""The training loop end to end on a tiny random-initialised Llama target: train, checkpoint,
resume, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from torchspec_ext import train
from torchspec_ext.drafts.eagle3 import Eagle3Draft
from torchspec_ext.training.errors import Interrupted, StopSignals
from torchspec_ext.training.trainer import DraftTrainer

from conftest import run_train, tiny_argv, write_chat


def losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def logged_steps(out_dir):
    return sorted(
        json.loads(line)["step"]
        for line in (out_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    )


def test_trains_checkpoints_and_resumes_on_the_same_curve(tiny_target, tmp_path, monkeypatch, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()
    split.mkdir()
    assert run_train(tiny_target, straight, "--max-steps", "6", "--save-interval", "3") == 0
    draft_dir = straight / "out" / "draft"
    assert (draft_dir / "config.json").is_file() and (draft_dir / "model.safetensors").is_file()
    assert (straight / "out" / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    # Ctrl-C during step 5: the checkpoint of step 4 (the last finished one) is written, and
    # --resume continues the curve from there.
    real, calls = DraftTrainer.step, []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 5:
            raise Interrupted(signal.SIGINT)
        return real(self, batch)

    monkeypatch.setattr(DraftTrainer, "step", interrupted)
    with pytest.raises(SystemExit) as stop:
        run_train(tiny_target, split, "--max-steps", "6", "--save-interval", "3")
    err = capsys.readouterr().err
    assert stop.value.code == 130 and "SIGINT at step 4: saved" in err and "step-00000004" in err
    assert (split / "out" / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    monkeypatch.setattr(DraftTrainer, "step", real)
    assert run_train(tiny_target, split, "--max-steps", "6", "--save-interval", "3", "--resume") == 0
    want, got = losses(straight / "out"), losses(split / "out")
    assert logged_steps(split / "out") == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing run twice
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    a = Eagle3Draft.load(draft_dir).trained_state()
    b = Eagle3Draft.load(split / "out" / "draft").trained_state()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    # The run exports as an EAGLE-3 checkpoint with the trained weights (float32: bit for bit).
    from torchspec_ext import export

    assert export.main([str(straight / "out"), "--out", str(tmp_path / "eagle3"), "--dtype", "float32"]) == 0
    exported = Eagle3Draft.load(tmp_path / "eagle3").trained_state()
    for name in ("fc.weight", "midlayer.self_attn.q_proj.weight", "lm_head.weight", "d2t"):
        assert torch.equal(exported[name], a[name]), name


def test_loss_goes_down(tiny_target, tmp_path):
    assert run_train(tiny_target, tmp_path, "--max-steps", "30", "--save-interval", "100", "--lr", "3e-3") == 0
    curve = losses(tmp_path / "out")
    assert sum(curve[s] for s in range(26, 31)) < 0.8 * sum(curve[s] for s in range(1, 6))
    final = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    # Greedy decoding with the draft, as a chain and as trees: at least the target's own token per forward.
    assert final["final_eval_acceptance_length"] >= 1.0 and final["final_eval_tree_acceptance_length"] >= 1.0


def test_reference_ops_and_hard_ce_train(tiny_target, tmp_path):
    assert (
        run_train(
            tiny_target, tmp_path, "--max-steps", "2", "--reference-ops", "--loss", "hard_ce", "--responses", "target"
        )
        == 0
    )


def test_same_loss_with_reference_ops(tiny_target, tmp_path):
    ours, ref = tmp_path / "ours", tmp_path / "ref"
    ours.mkdir()
    ref.mkdir()
    assert run_train(tiny_target, ours, "--max-steps", "3") == 0
    assert run_train(tiny_target, ref, "--max-steps", "3", "--reference-ops") == 0
    a, b = losses(ours / "out"), losses(ref / "out")
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=2e-4), step


def test_nan_loss_stops_with_step_and_batch_named(tiny_target, tmp_path, monkeypatch, capsys):
    real = DraftTrainer.step
    calls = []

    def poisoned(self, batch):
        calls.append(1)
        if len(calls) == 2:
            batch.features = batch.features * float("nan")
        return real(self, batch)

    monkeypatch.setattr(DraftTrainer, "step", poisoned)
    assert run_train(tiny_target, tmp_path, "--max-steps", "4", "--save-interval", "1", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "not finite at step 2" in err and "batch 1" in err
    # The checkpoint of step 1 is intact and resumable.
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == "step-00000001"


def test_bad_input_gets_a_clear_message(tiny_target, tmp_path, capsys):
    def refused(*argv) -> str:
        """The command's stderr, after it exits with status 2 (a problem with the user's input)."""
        assert train.main([str(a) for a in argv]) == 2
        return capsys.readouterr().err

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = tmp_path / "o"
    data = write_chat(tmp_path / "chat.json")
    assert "no usable conversation" in refused("--target", tiny_target, "--data", empty, "--output-dir", out,
                                               "--max-length", 64)  # fmt: skip
    assert "longer than the target's context" in refused("--target", tiny_target, "--data", data, "--output-dir",
                                                         out, "--max-length", 100000)  # fmt: skip
    assert "cannot load the target" in refused("--target", tmp_path / "nowhere", "--output-dir", out)
    assert "no checkpoint" in refused("--target", tiny_target, "--data", data, "--output-dir", tmp_path / "o2",
                                      "--max-length", 64, "--resume")  # fmt: skip
    not_a_model = tmp_path / "not_a_model"  # a config.json and nothing else
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text('{"model_type": "llama"}')
    err = refused("--target", not_a_model, "--output-dir", out)
    assert f"{not_a_model} is not a causal-LM directory that transformers can load" in err
    err = refused("--target", tiny_target, "--data", data, "--output-dir", out, "--max-length", 64,
                  "--draft-vocab", 10000000)  # fmt: skip
    assert "--draft-vocab 10000000 is larger than the target's vocabulary: give 1 to" in err
    if not torch.cuda.is_available():
        assert "--device cuda: no CUDA GPU is usable here" in refused("--device", "cuda", "--output-dir", out)


def test_target_without_chat_template(tiny_target, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_target, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (bare / extra).unlink(missing_ok=True)
    data = write_chat(tmp_path / "chat.json")
    assert (
        train.main(
            ["--target", str(bare), "--data", str(data), "--output-dir", str(tmp_path / "o"), "--max-length", "64"]
        )
        == 2
    )
    assert "no chat template" in capsys.readouterr().err


def test_config_file_and_flags(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("max_steps = 7\nlr = 0.002\n")
    args = train.parse_args(["--config", str(config), "--lr", "0.005"])
    assert args.max_steps == 7 and args.lr == 0.005
    (tmp_path / "bad.json").write_text('{"max_stepz": 3}')
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(tmp_path / "bad.json")])


def test_defaults_depend_on_the_device():
    # CPU: the target's forward is most of a step, so its batches are replayed (3 passes).
    cpu = train.parse_args(["--device", "cpu"])
    assert (cpu.max_steps, cpu.epochs, cpu.batch_size, cpu.family_options.ttt_steps) == (180, 3, 2, 3)
    gpu = train.parse_args(["--device", "cuda"])
    assert (gpu.max_steps, gpu.epochs, gpu.batch_size, gpu.family_options.ttt_steps) == (2000, 1, 16, 7)
    given = train.parse_args(["--device", "cpu", "--epochs", "1", "--batch-size", "4"])
    assert (given.epochs, given.batch_size) == (1, 4)


def test_generated_replies_match_a_teacher_pass_over_them(tiny_target):
    """The features and top-k gathered while the target decodes equal those of one teacher pass
    over the finished rows (right-aligned, mask on the reply through its end token)."""
    from torchspec_ext.target import load_target
    from torchspec_ext.teacher import Teacher

    target, _ = load_target(tiny_target)
    to_draft = torch.arange(target.config.vocab_size)
    teacher = Teacher(target, [1, 3, 5], to_draft, topk=8)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    eos = [int(target(torch.tensor([[11, 12, 13]])).logits[0, -1].argmax())]  # row 1 stops at once
    batch = teacher.generate([prompts], 5, [3], pad_id=0, eos_ids=eos)[0]
    batch, full = batch.tensors(), teacher(batch.input_ids[:1], batch.loss_mask[:1], 3).tensors()
    assert batch["input_ids"].shape[1] == 6 + 5 - 1  # the last generated token is never fed back
    torch.testing.assert_close(batch["features"][:1], full["features"], rtol=1e-4, atol=1e-4)
    # The teacher's rows from the last prompt token on (those that predict a reply token).
    torch.testing.assert_close(batch["teacher_logprobs"][:1, 5:], full["teacher_logprobs"][:, 5:], rtol=1e-4, atol=1e-4)
    assert torch.equal(batch["teacher_indices"][:1, 5:], full["teacher_indices"][:, 5:])
    assert torch.equal(batch["teacher_argmax"][:1, 5:], full["teacher_argmax"][:, 5:])
    assert (batch["teacher_indices"][:1, :5] == -1).all() and (batch["teacher_argmax"][:1, :5] == -1).all()
    assert batch["loss_mask"][0].tolist() == [False] * 6 + [True] * 4
    # Row 1: the prompt, its one-token reply (the end token), nothing after.
    assert batch["input_ids"][1, :4].tolist() == [11, 12, 13, eos[0]]
    assert batch["loss_mask"][1].tolist() == [False] * 3 + [True] + [False] * 6
    assert batch["teacher_argmax"][1, 2] == eos[0]
    # Decoded together, returned as one batch per group, each as wide as its longest row.
    first, second = (
        b.tensors() for b in teacher.generate([prompts[:1], prompts[1:]], 5, [3, 4], pad_id=0, eos_ids=eos)
    )
    assert int(first["batch_index"]) == 3 and int(second["batch_index"]) == 4
    for key in ("input_ids", "loss_mask", "features", "teacher_indices", "teacher_argmax"):
        torch.testing.assert_close(first[key], batch[key][:1])
        torch.testing.assert_close(second[key], batch[key][1:, :4])


def test_training_unroll_equals_the_drafter_at_inference():
    """Step s of the training-time-test unroll at index t is what the tree drafter computes after
    the context ``ids[:t + 2]`` and the path ``ids[t + 2 : t + 2 + s]``: training and decoding
    share one attention pattern."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from torchspec_ext.drafts.eagle3 import DraftConfig, Eagle3Drafter

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    target = LlamaForCausalLM(config).eval()
    draft = Eagle3Draft(DraftConfig.from_target(config, 100))
    draft.set_vocab(torch.randperm(300)[:100])
    draft.init_from_target(target)
    torch.nn.init.normal_(draft.fc.weight, std=0.05)  # not the identity start: every input matters
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        hidden = target(ids, output_hidden_states=True).hidden_states
        features = torch.cat([hidden[i] for i in draft.config.feature_layers], -1)
        outputs = draft.unroll(features[:, :14], ids, 4)
        drafter = Eagle3Drafter(draft)
        for t in (0, 5, 13):
            for s in range(4):
                drafter.reset(features[0, : t + 1])
                got = drafter.next_logprobs(ids[0, : t + 2].tolist(), [ids[0, t + 2 : t + 2 + s].tolist()])[0]
                want = torch.log_softmax(draft.lm_head(outputs[s][0, t]), -1)
                torch.testing.assert_close(got[draft.draft_to_target()], want, rtol=0, atol=1e-5)


def start_run(tiny_target, tmp_path, *extra, prelude=""):
    """The training command in a child process (``prelude``: Python run before it, e.g. a patch)."""
    argv = tiny_argv(tiny_target, tmp_path, *extra, log_interval=10)
    code = f"{prelude}\nimport sys\nfrom torchspec_ext import train\nsys.exit(train.main({argv!r}))"
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)


def wait_for(process, text, timeout=120):
    """The child's stderr up to the first line holding ``text``."""
    seen, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    process.kill()
    raise AssertionError(f"never saw {text!r}:\n{''.join(seen)}")


def test_a_signal_is_raised_at_a_safe_point_never_inside_a_held_lock(capfd):
    """Outside ``interruptible()`` a signal is only recorded, so it cannot leave a lock (a queue's, a
    writer's) held for the checkpoint write that follows; ``check()`` raises it."""
    lock, sigint_before = threading.Lock(), signal.getsignal(signal.SIGINT)  # ignored under nohup or `&`
    with StopSignals() as signals:
        with lock:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, in the main thread, and returns
        assert not lock.locked()
        with pytest.raises(Interrupted) as stop:
            signals.check()
    assert stop.value.name == "SIGTERM" and "SIGTERM: stopping after the current step" in capfd.readouterr().err
    with StopSignals() as signals, pytest.raises(Interrupted):
        with signals.interruptible():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # pure computation: interrupted at once
    assert signal.getsignal(signal.SIGINT) is sigint_before  # the handlers are given back


def ended(process, timeout=300):
    """(exit status, the child's whole stderr); a child still running after ``timeout`` s is killed
    and fails the test, so a hang cannot stall the suite."""
    try:
        err = process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the run hung for {timeout} s:\n{process.communicate()[1]}") from None
    return process.returncode, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_current_step_then_resume_finishes(tiny_target, tmp_path, signum):
    """SIGTERM (a scheduler's notice) and SIGINT (Ctrl-C) write a checkpoint of the step reached,
    with no periodic checkpoint to fall back on, and exit with the resume hint; the resumed run
    finishes the checkpoint's plan."""
    child = start_run(tiny_target, tmp_path, "--max-steps", "50", "--save-interval", "100000")
    wait_for(child, "step 20/50")
    child.send_signal(signum)
    code, err = ended(child)
    assert code == 128 + signum, err
    name = signal.Signals(signum).name
    assert f"[train] {name} at step" in err and "continue with --resume" in err and "Traceback" not in err
    saved = (tmp_path / "out" / "checkpoints" / "latest").read_text().strip()
    step = torch.load(tmp_path / "out" / "checkpoints" / saved / "trainer.pt", weights_only=False)["step"]
    assert 20 <= step < 50 and saved == f"step-{step:08d}"
    last_logged = max(logged_steps(tmp_path / "out"))  # every 10th step has a line
    assert last_logged <= step < last_logged + 10  # the checkpoint is of the last step that ran
    # --max-steps does not cut a resumed run short: it keeps its checkpoint's plan, and says so.
    resumed = start_run(tiny_target, tmp_path, "--max-steps", str(step + 5), "--save-interval", "100000", "--resume")
    code, err = ended(resumed)
    assert f"resumed from {tmp_path / 'out' / 'checkpoints' / saved} at step {step}, on its plan of 50 steps" in err
    assert code == 0 and logged_steps(tmp_path / "out") == [10, 20, 30, 40, 50]  # nothing lost or run twice


def test_a_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tiny_target, tmp_path):
    # The second checkpoint's trainer state is half written when the process is killed (-9).
    prelude = """
import os, signal, torch
real_save, saves = torch.save, []
def dying_save(obj, path, *a, **k):
    saves.append(path)
    if len(saves) == 2:
        with open(path, "wb") as f:
            f.write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *a, **k)
torch.save = dying_save
"""
    child = start_run(tiny_target, tmp_path, "--max-steps", "6", "--save-interval", "3", prelude=prelude)
    assert ended(child)[0] == -signal.SIGKILL
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    resumed = start_run(tiny_target, tmp_path, "--max-steps", "6", "--save-interval", "3", "--resume")
    code, err = ended(resumed)
    assert "at step 3" in err and code == 0, err
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == "step-00000006"


def test_training_flushes_subnormals_and_restores_the_default():
    from torchspec_ext.train import subnormals_flushed

    tiny = torch.tensor([1e-40])  # a float32 subnormal
    with subnormals_flushed():
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() != 0.0


def test_a_bfloat16_target_teaches_what_the_float32_one_does(tiny_target, tmp_path):
    """--target-dtype bfloat16 halves the target's memory; its features and top-k are the float32
    target's to bfloat16 rounding, so the first losses agree to a percent."""
    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    f32.mkdir()
    bf16.mkdir()
    assert run_train(tiny_target, f32, "--max-steps", "3") == 0
    assert run_train(tiny_target, bf16, "--max-steps", "3", "--target-dtype", "bfloat16") == 0
    want, got = losses(f32 / "out"), losses(bf16 / "out")
    assert got == pytest.approx(want, rel=0.01) and got != want


@pytest.mark.parametrize("loss", ["lk-alpha", "lk-lambda"])
def test_lk_losses_train_as_their_reference(tiny_target, tmp_path, loss):
    ours, ref = tmp_path / "ours", tmp_path / "ref"
    ours.mkdir()
    ref.mkdir()
    assert run_train(tiny_target, ours, "--max-steps", "3", "--loss", loss) == 0
    assert run_train(tiny_target, ref, "--max-steps", "3", "--loss", loss, "--reference-ops") == 0
    a, b = losses(ours / "out"), losses(ref / "out")
    assert len(a) == 3 and all(math.isfinite(v) for v in a.values())
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=2e-4), step


def test_a_checkpoint_holding_code_is_refused_on_resume(tiny_target, tmp_path, capsys):
    """trainer.pt is read with weights_only=True: a pickle that would run code is refused, by name."""
    import pickle

    assert run_train(tiny_target, tmp_path, "--max-steps", "2", "--save-interval", "2") == 0
    checkpoint = tmp_path / "out" / "checkpoints" / "step-00000002"
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)  # what train writes loads this way

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    state["options"] = Payload()
    with open(checkpoint / "trainer.pt", "wb") as f:
        pickle.dump(state, f)
    assert run_train(tiny_target, tmp_path, "--max-steps", "4", "--resume") == 2
    err = capsys.readouterr()
    assert "holds more than tensors and plain values" in err.err and "pwned" not in err.out + err.err


def test_the_draft_folders_are_readable_by_others(tiny_target, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        assert run_train(tiny_target, tmp_path, "--max-steps", "2", "--save-interval", "2") == 0
    finally:
        os.umask(old)
    for folder in (tmp_path / "out" / "draft", tmp_path / "out" / "checkpoints" / "step-00000002"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        for path in folder.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_a_signal_during_the_final_evaluation_says_what_is_saved(tiny_target, tmp_path):
    """SIGTERM while the final draft is evaluated: the run names the draft and the checkpoint it saved
    and exits with the signal's status."""
    prelude = (
        "import os, signal\n"
        "from torchspec_ext.training import evaluation\n"
        "real = evaluation.HeldOutCheck.__call__\n"
        "def slow(self, draft):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(self, draft)\n"
        "evaluation.HeldOutCheck.__call__ = slow\n"
    )
    child = start_run(tiny_target, tmp_path, "--max-steps", "3", prelude=prelude)
    code, err = ended(child)
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM during the final evaluation" in err and "is saved in" in err and "Traceback" not in err
    assert (tmp_path / "out" / "draft" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == "step-00000003"
