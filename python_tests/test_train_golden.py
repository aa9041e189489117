"""The training loop's numbers on a fixed seed, against records written before the training code
was restructured: per-step losses and accuracies, and the final held-out acceptance lengths, in five
configurations (replayed epochs, one pass with hard_ce over the whole vocabulary, the target's own
replies with the reference ops, a teacher cache, and a predictable target whose draft accepts more
than one token per forward, so that the record guards the evaluation too).

Float32 results depend on the machine (its CPU's kernels, the thread count) besides the code, so
the file keeps one record per machine. Where a record was made on this machine (the same torch,
CPU, capability and threads) the numbers must match it bit for bit: a change that changes no
arithmetic changes no bit. Elsewhere they must agree to 1e-5 (relative). Add this machine's record
(only from code whose numbers are known good, said in the commit) with
``python python_tests/test_train_golden.py``.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_train

RECORD = Path(__file__).with_name("golden") / "train_losses.json"
CASES = {
    "replayed_epochs": ("tiny_target", ["--max-steps", "6"]),
    "one_pass_hard_ce_whole_vocab": (
        "tiny_target",
        ["--max-steps", "4", "--epochs", "1", "--loss", "hard_ce", "--draft-vocab", "49152"],
    ),
    "target_replies_reference_ops": ("tiny_target", ["--max-steps", "4", "--responses", "target", "--reference-ops"]),
    "teacher_cache": ("tiny_target", ["--max-steps", "4", "--cache-teacher", "{tmp}/cache"]),
    "predictable_target_accepts": ("predictable_target", ["--max-steps", "6", "--eval-new-tokens", "24"]),
}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def where() -> dict:
    """What float32 results depend on besides the code: the kernels, the CPU, the threads."""
    return {
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def this_machines_record(records: list[dict]) -> dict | None:
    """The record made where this runs. A record without a CPU model (the first one) counts as made
    here unless another record names this CPU."""
    here = where()
    same = lambda r, keys: all(r["where"].get(k) == here[k] for k in keys)
    exact = [r for r in records if same(r, here)]
    if exact:
        return exact[0]
    legacy = [r for r in records if "cpu" not in r["where"] and same(r, ("torch", "cpu_capability", "threads"))]
    return legacy[0] if legacy else None


def numbers(target_dir: Path, tmp: Path, case: str) -> dict:
    """The case's per-step metrics and final evaluation, numbers as hex floats (exact; a named value,
    such as the best evaluation mode, is not a number and is left out)."""
    argv = [a.replace("{tmp}", str(tmp)) for a in CASES[case][1]]
    assert run_train(target_dir, tmp, *argv) == 0
    rows = [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    keep = lambda key: key == "loss" or key.startswith(("loss_step", "accuracy_step", "final_eval_"))
    return {
        f"{row['step']}/{key}": float(value).hex()
        for row in rows
        for key, value in row.items()
        if keep(key) and isinstance(value, (int, float))
    }


@pytest.mark.parametrize("case", list(CASES))
def test_same_numbers_as_the_record(request, tmp_path, case):
    records = json.loads(RECORD.read_text())["records"]
    got = numbers(request.getfixturevalue(CASES[case][0]), tmp_path, case)
    mine = this_machines_record(records)
    # Every number the record holds must be there; numbers added after it was made (a later
    # evaluation mode's) are not guarded by it.
    if mine is not None and case in mine["cases"]:
        want = mine["cases"][case]
        assert sorted(want.keys() - got.keys()) == []
        assert {key: got[key] for key in want} == want
        return
    want = next(r["cases"][case] for r in records if case in r["cases"])
    assert sorted(want.keys() - got.keys()) == []
    for key in want:
        assert float.fromhex(got[key]) == pytest.approx(float.fromhex(want[key]), rel=1e-5, abs=1e-7), key


def test_the_predictable_case_guards_the_evaluation():
    """Its record's acceptance lengths are above 1, so a change in decoding or verification shows."""
    for record in json.loads(RECORD.read_text())["records"]:
        case = record["cases"].get("predictable_target_accepts", {})
        final = [float.fromhex(v) for k, v in case.items() if "final_eval_" in k]
        assert all(v > 1.5 for v in final)


if __name__ == "__main__":
    import tempfile

    from conftest import predictable_target, tiny_target

    with tempfile.TemporaryDirectory() as root:
        factory = type("Factory", (), {"mktemp": lambda self, name: Path(root) / name})()
        targets = {"tiny_target": tiny_target.__wrapped__(factory), "predictable_target": None}
        targets["predictable_target"] = predictable_target.__wrapped__(factory)
        cases = {}
        for case, (fixture, _) in CASES.items():
            tmp = Path(root) / case
            tmp.mkdir()
            cases[case] = numbers(targets[fixture], tmp, case)
            print(case, len(cases[case]), "numbers", file=sys.stderr)
    records = json.loads(RECORD.read_text())["records"] if RECORD.is_file() else []
    records = [r for r in records if r["where"] != where()] + [{"where": where(), "cases": cases}]
    RECORD.write_text(json.dumps({"records": records}, indent=1, sort_keys=True) + "\n")
