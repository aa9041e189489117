"""The training loop's numbers on a fixed seed, against a record written before the training code
was split into a package: per-step losses and accuracies, and the final held-out acceptance
lengths, in four configurations (replayed epochs, one pass with hard_ce over the whole vocabulary, the target's own
replies
with the reference ops, a teacher cache).

Where the record was made (the same torch, CPU capability and thread count) they must match bit for bit: a
refactor that changes no arithmetic changes no bit. Elsewhere float32 kernels may round
differently, so they must agree to 1e-5 (relative). Regenerate the record (only for an intended
change of the numbers, said in the commit) with ``python python_tests/test_train_golden.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from test_train import run, tiny_target  # noqa: F401 (the fixture)

RECORD = Path(__file__).with_name("golden") / "train_losses.json"
CASES = {
    "replayed_epochs": ["--max-steps", "6"],
    "one_pass_hard_ce_whole_vocab": [
        "--max-steps",
        "4",
        "--epochs",
        "1",
        "--loss",
        "hard_ce",
        "--draft-vocab",
        "49152",
    ],
    "target_replies_reference_ops": ["--max-steps", "4", "--responses", "target", "--reference-ops"],
    "teacher_cache": ["--max-steps", "4", "--cache-teacher", "{tmp}/cache"],
}


def where() -> dict:
    """What float32 results depend on besides the code: the kernels, the vector units, the threads."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def numbers(target_dir: Path, tmp: Path, case: str) -> dict:
    """The case's per-step metrics and final evaluation, floats as hex (exact)."""
    argv = [a.replace("{tmp}", str(tmp)) for a in CASES[case]]
    assert run(target_dir, tmp, *argv) == 0
    rows = [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    keep = lambda key: key == "loss" or key.startswith(("loss_step", "accuracy_step", "final_eval_"))
    return {f"{row['step']}/{key}": float(value).hex() for row in rows for key, value in row.items() if keep(key)}


@pytest.mark.parametrize("case", list(CASES))
def test_same_numbers_as_the_record(tiny_target, tmp_path, case):
    record = json.loads(RECORD.read_text())
    want, got = record["cases"][case], numbers(tiny_target, tmp_path, case)
    assert sorted(got) == sorted(want)
    if record["where"] == where():
        assert got == want
    else:
        for key in want:
            assert float.fromhex(got[key]) == pytest.approx(float.fromhex(want[key]), rel=1e-5, abs=1e-7), key


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        target = tiny_target.__wrapped__(type("Factory", (), {"mktemp": lambda self, name: Path(root) / name})())
        cases = {}
        for case in CASES:
            tmp = Path(root) / case
            tmp.mkdir()
            cases[case] = numbers(target, tmp, case)
            print(case, len(cases[case]), "numbers", file=sys.stderr)
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps({"where": where(), "cases": cases}, indent=1, sort_keys=True) + "\n")
