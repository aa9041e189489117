"""python -m torchspec_ext.eval on the tiny targets: the report per set, turn and mode (JSON and
tables), the per-position plot, the export round trip, and the chat template a draft was trained with."""

from __future__ import annotations

import json
import shutil

import pytest

from torchspec_ext.eval import main as eval_main

from conftest import run_train

PROMPTS = [
    {"id": "a", "category": "writing", "turns": ["Write a line about the sea.", "Now make it rhyme."]},
    {"id": "b", "category": "math", "turns": ["What is two plus two?"]},
    "Tell me something.",
]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(PROMPTS))
    return path


def evaluate(capsys, *argv) -> dict:
    assert eval_main([*map(str, argv), "--dtype", "float32", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_report_per_set_turn_and_mode(predictable_target, prompt_file, tmp_path, capsys):
    plot = tmp_path / "positions.png"
    report = evaluate(
        capsys, "--target", predictable_target, "--draft", "target", "--prompts", prompt_file, "--max-new-tokens", 12,
        "--depth", 3, "--topk", 2, "--max-nodes", 6, "--min-prob", 0, "--plot", plot,
    )  # fmt: skip
    rows = {r["mode"]: r for r in report["rows"]}
    assert list(rows) == ["plain", "prompt lookup", "chain", "tree", "lookup", "suffix", "combined"]
    assert report["header"]["sets"][str(prompt_file)]["items"] == 3
    plain = rows["plain"]
    assert plain["decodes"] == 4 and plain["acceptance_length"] == 1.0  # 3 items, one of them two turns
    for mode in ("chain", "tree"):  # greedy, float32: every output is plain decoding's
        r = rows[mode]
        assert r["same_as_plain"] == r["compared_with_plain"] == 4 and r["agreeing_tokens"] == plain["tokens"]
        assert r["agreeing_fraction"] == 1.0 and r["tokens"] == plain["tokens"]
        # The target as its own draft accepts every draft position: vLLM's count is 1 + depth.
        assert r["acceptance_length_vllm"] == 4.0 and r["per_position_acceptance"] == [1.0, 1.0, 1.0]
        assert 1.0 < r["acceptance_length"] <= r["acceptance_length_vllm"]
    turns = {(r["turn"], r["mode"]): r for r in report["turns"]}
    assert turns[(1, "plain")]["decodes"] == 1 and turns[(0, "plain")]["decodes"] == 3
    assert {r["category"] for r in report["categories"]} == {"writing", "math", prompt_file.name}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert eval_main(["--target", str(predictable_target), "--draft", "lookup", "--prompts", str(prompt_file),
                      "--max-new-tokens", "8", "--dtype", "float32"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "| lookup |" in table and "acceptance length per turn" in table


def test_a_count_for_prompts_is_pointed_at_limit(capsys):
    with pytest.raises(SystemExit):
        eval_main(["--prompts", "16"])
    assert "give the count with --limit" in capsys.readouterr().err


def test_the_exported_draft_accepts_as_the_trained_one(predictable_target, prompt_file, tmp_path, capsys):
    """train -> export (bfloat16, the default) -> eval of the export: the acceptance of the training
    output's draft, within the rounding of bfloat16 weights."""
    from torchspec_ext.export import main as export_main

    assert run_train(predictable_target, tmp_path, "--max-steps", "6", "--eval-new-tokens", "24") == 0
    assert export_main([str(tmp_path / "out"), "--out", str(tmp_path / "export")]) == 0
    capsys.readouterr()  # the summaries train and export print
    found = {}
    for name in ("out/draft", "export"):
        report = evaluate(capsys, "--target", predictable_target, "--draft", tmp_path / name, "--prompts",
                          prompt_file, "--max-new-tokens", 24, "--min-prob", 0)  # fmt: skip
        found[name] = {r["mode"]: r["acceptance_length"] for r in report["rows"]}
        assert all(r["same_as_plain"] == r["compared_with_plain"] for r in report["rows"])
    assert found["out/draft"]["chain"] > 1.5  # the predictable target: the draft accepts
    for mode in ("chain", "tree"):
        assert found["export"][mode] == pytest.approx(found["out/draft"][mode], abs=0.15), mode
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["training"]["chat_template"] and "torchspec_ext" not in config  # the metadata survives export


def test_eval_renders_prompts_with_the_template_the_draft_was_trained_with(
    predictable_target, prompt_file, tmp_path, capsys
):
    """A target whose tokenizer renders chats differently (here: a thinking-mode preamble in every
    generation prompt) is warned about, and the training template is used."""
    assert run_train(predictable_target, tmp_path, "--max-steps", "2") == 0
    capsys.readouterr()
    other = tmp_path / "thinking_target"
    shutil.copytree(predictable_target, other)
    config_path = other / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template = (other / "chat_template.jinja").read_text() if (other / "chat_template.jinja").is_file() else None
    template = template or config["chat_template"]
    thinking = template + "{% if add_generation_prompt %}<think>\n\n</think>\n\n{% endif %}"
    if (other / "chat_template.jinja").is_file():
        (other / "chat_template.jinja").write_text(thinking)
    else:
        config["chat_template"] = thinking
        config_path.write_text(json.dumps(config))
    assert eval_main(["--target", str(other), "--draft", str(tmp_path / "out" / "draft"), "--prompts",
                      str(prompt_file), "--max-new-tokens", "4", "--dtype", "float32", "--json"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "renders chats differently from the one this draft was trained with" in captured.err
    assert "<think>" in json.loads(captured.out)["header"]["template_warning"]


def test_the_lossless_part_finds_no_flip_in_float32(predictable_target, prompt_file):
    """bench lossless: verification's chunks score plain decoding's tokens; in float32 no argmax moves."""
    import argparse

    from torchspec_ext.bench import lossless

    args = argparse.Namespace(prompts=[str(prompt_file)], limit=2, max_new_tokens=10, depth=3,
                              target=str(predictable_target), quick=True)  # fmt: skip
    rows = {(r["dtype"], r["path"]): r for r in lossless.run(args).rows}
    assert {path for _, path in rows} == {"chunks, model attention", "chunks, tree_attention"}
    for (dtype, _), row in rows.items():
        assert row["positions"] > 0 and row["max_diff"] < (1e-3 if dtype == "float32" else 1.0)
        if dtype == "float32":
            assert row["flips"] == 0
