"""``python -m torchspec_ext.bench all``: one report of several parts, with plots, that survives a failing part."""

import json

import pytest
import torch

from torchspec_ext.bench import __main__ as bench_cli
from torchspec_ext.bench import draft_loss, topk, tree

QUICK_PARTS = {"topk": topk, "draft_loss": draft_loss, "tree": tree}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_report")
    argv = ["all", "--quick", "--parts", ",".join(QUICK_PARTS), "--device", "cpu", "--out", str(out), "--repeat", "1"]
    assert bench_cli.main(argv) == 0
    return out


def test_report_has_a_header_and_every_part_table(quick_report):
    text = (quick_report / "report.md").read_text()
    assert text.startswith("# torchspec_ext benchmark report")
    assert f"- torch: {torch.__version__}" in text and "- command: python -m torchspec_ext.bench all --quick" in text
    for name in QUICK_PARTS:
        section = text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        table = [line for line in section.splitlines() if line.startswith("|")]
        # Title, separator, and one line per default quick case.
        assert len(table) == 2 + len(QUICK_PARTS[name].default_cases(torch.device("cpu"), True)), name
        assert "| compile ms | ours/compile |" in table[0]


def test_report_json_holds_each_part_and_the_compile_baseline(quick_report):
    data = json.loads((quick_report / "report.json").read_text())
    assert data["header"]["device"].startswith("cpu") and data["header"]["torch"] == torch.__version__
    assert list(data["parts"]) == list(QUICK_PARTS)
    for name, module in QUICK_PARTS.items():
        part = data["parts"][name]
        cases = module.default_cases(torch.device("cpu"), True)
        assert part["status"] == "ok" and part["benchmark"] == name and len(part["rows"]) == len(cases)
        # The compile baseline ran on exactly the cases that ask for it: a time, or "failed" with the reason.
        for case, row in zip(cases, part["rows"]):
            if not case.compile:
                assert "compile_ms" not in row
            elif row["compile_ms"] == "failed":
                assert row["compile_error"]
            else:
                assert row["compile_ms"] > 0 and row["ours_over_compile"] == pytest.approx(
                    row["ours_ms"] / row["compile_ms"]
                )


def test_report_plots_are_pngs(quick_report):
    pytest.importorskip("matplotlib")
    data = json.loads((quick_report / "report.json").read_text())
    expected = ["topk_time.png", "draft_loss_time.png", "draft_loss_memory.png", "tree_time.png"]
    assert data["plots"] == expected
    text = (quick_report / "report.md").read_text()
    for name in expected:
        content = (quick_report / name).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 5000, name
        assert f"![{name}]({name})" in text


def test_a_failing_part_a_failing_compile_and_a_missing_draft_are_reported(tmp_path, monkeypatch):
    def broken(args):
        raise RuntimeError("no such kernel")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("InductorError: no C++ compiler")

    monkeypatch.chdir(tmp_path)  # no torchspec_out/draft here
    monkeypatch.setattr(topk, "run", broken)
    monkeypatch.setattr(torch, "compile", no_compiler)
    first_attention = tree.default_cases(torch.device("cpu"), True)[0]
    assert first_attention.compile
    monkeypatch.setattr(tree, "default_cases", lambda device, quick: [first_attention])
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed

    out = tmp_path / "report"
    argv = ["all", "--quick", "--parts", "topk,tree,acceptance", "--device", "cpu", "--out", str(out), "--repeat", "1"]
    assert bench_cli.main(argv) == 0
    data = json.loads((out / "report.json").read_text())
    parts = data["parts"]
    assert parts["topk"]["status"] == "failed" and parts["topk"]["reason"] == "RuntimeError: no such kernel"
    assert parts["tree"]["status"] == "ok"
    row = parts["tree"]["rows"][0]
    assert row["compile_ms"] == "failed" and "no C++ compiler" in row["compile_error"] and row["ours_ms"] > 0
    assert (
        parts["acceptance"]["status"] == "skipped" and "python -m torchspec_ext.train" in parts["acceptance"]["reason"]
    )
    assert data["plots"] == [] and "matplotlib is missing" in data["plots_note"]

    text = (out / "report.md").read_text()
    assert "## topk\n\n**failed**" in text and "RuntimeError: no such kernel" in text
    assert "## acceptance\n\n**skipped**" in text
    assert "| failed | failed |" in text  # the tree row's compile cells
    assert "No plots: matplotlib is missing" in text and not list(out.glob("*.png"))


def test_unknown_part_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        bench_cli.main(["all", "--parts", "topk,nonsense"])
    assert "unknown part(s) nonsense" in capsys.readouterr().err


def test_acceptance_plot_from_a_report(tmp_path):
    pytest.importorskip("matplotlib")
    from torchspec_ext.bench.plots import write_plots
    from torchspec_ext.bench.report import Report

    rows = [
        {"mode": "plain", "max_nodes": None, "acceptance_length": 1.0},
        {"mode": "chain", "max_nodes": 6, "acceptance_length": 1.5},
    ]
    rows += [{"mode": f"tree {n}", "max_nodes": n, "acceptance_length": 1 + n / 16} for n in (4, 8, 16, 32)]
    assert write_plots({"acceptance": Report("acceptance", {}, [], rows)}, tmp_path) == ["acceptance.png"]
    assert (tmp_path / "acceptance.png").read_bytes().startswith(PNG_MAGIC)


def test_cuda_attention_bytes_follow_the_kernel_blocking():
    from pathlib import Path

    header = (Path(__file__).resolve().parents[1] / "csrc" / "common" / "tree.h").read_text()
    assert f"kTreeAttentionRowsPerBlock = {tree.CUDA_ROWS_PER_BLOCK};" in header
    # The GPU shape: 4 tiles of 16 nodes per (row, kv head), each reading the 4096-token prefix.
    shape = (64, 32, 8, 64, 4096, 128, 2)
    per_unit = sum(2 * 4 * 16 * 128 + 2 * (4096 + j0 + 16) * 128 for j0 in (0, 16, 32, 48))
    assert tree.cuda_attention_bytes(*shape) == 64 * 8 * per_unit * 2
    assert tree.attention_floor_bytes(*shape) == (2 * 64 * 32 * 64 + 2 * 64 * 8 * 4160) * 128 * 2
    # The tensor-core kernel at the issue-31 shape: 12 (row, kv head) units of 3 blocks of 64 rows, 8 key
    # ranges (288 blocks for 132 multiprocessors), the dense attention's FLOPs, the floor.
    cost = tree.tensor_core_cost(4, 9, 3, 64, 4096, 64, 2)
    assert cost["splits"] == 8 and cost["dense_flops"] == 4 * 12 * 192 * 4160 * 64
    assert cost["floor_bytes"] == (2 * 4 * 9 * 64 + 2 * 12 * 4160) * 64 * 2 < cost["unique_bytes"] < cost["bytes"]
    note = tree.gpu_shape_notes()["CUDA tree_attention B=4 T=64 prefix=4096 Hq=9 Hkv=3 D=64 bf16"]
    assert "the floor of 12.75 MiB" in note and "H100 SXM: floor 4.0 us" in note
