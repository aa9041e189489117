"""Chat data loading: truncated JSON arrays, JSONL, both record styles, and the loss mask."""

import json

import pytest

from torchspec_ext.data import load_conversations, parse_conversation, split_held_out, tokenize_conversation


def sharegpt(i):
    return {
        "id": str(i),
        "conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": f"answer {i}"}],
    }


def test_truncated_json_array_keeps_every_complete_record(tmp_path):
    text = json.dumps([sharegpt(i) for i in range(50)], indent=2)
    cut = text.index('"answer 47"') + 5  # inside record 47
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])
    conversations, report = load_conversations(path)
    assert len(conversations) == 47 and report.kept == 47
    assert report.truncated_tail and report.skipped == 1
    assert conversations[46] == [
        {"role": "user", "content": "question 46"},
        {"role": "assistant", "content": "answer 46"},
    ]
    # Cut between two records (after a comma): nothing lost, still reported as truncated.
    path.write_text(text[: text.index('{\n    "id": "10"')])
    conversations, report = load_conversations(path)
    assert len(conversations) == 10 and report.truncated_tail and report.skipped == 0
    # A complete file: nothing skipped, not truncated.
    path.write_text(text)
    conversations, report = load_conversations(path)
    assert len(conversations) == 50 and not report.truncated_tail and report.skipped == 0


def test_jsonl_openai_style_and_bad_lines(tmp_path):
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        ),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),
        "",
        json.dumps({"conversations": [{"from": "alien", "value": "?"}, {"from": "gpt", "value": "!"}]}),
        json.dumps(sharegpt(1)),
        json.dumps([1, 2]),
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines))
    conversations, report = load_conversations(path)
    assert [c[-1]["content"] for c in conversations] == ["hello", "answer 1"]
    assert conversations[0][0] == {"role": "system", "content": "be brief"}
    assert report.skipped == 4 and not report.truncated_tail
    assert "line 2: not JSON" in report.summary() and "no assistant reply" in report.summary()
    assert "unknown speaker 'alien'" in report.summary()


def test_no_usable_record_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("{}\n")
    with pytest.raises(ValueError, match="no usable conversation"):
        load_conversations(path)


def test_parse_conversation_errors():
    for bad, why in [
        ([], "must be an object"),
        ({"conversations": []}, "no 'conversations'"),
        ({"conversations": [{"from": "gpt"}]}, "has no text"),
        ({"messages": ["hi"]}, "turn must be an object"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_conversation(bad)


def test_split_held_out_is_seeded_and_disjoint():
    items = list(range(100))
    train, held = split_held_out(items, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90 and sorted(train + held) == items
    assert split_held_out(items, 0.1, seed=3) == (train, held)
    assert split_held_out(items, 7)[1].__len__() == 7


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A small byte-level BPE tokenizer with a ChatML template (the default target's format)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(["the user asks and the assistant answers in plain words"] * 20, trainer)
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", chat_template=template
    )


def test_loss_mask_covers_assistant_replies_only(chat_tokenizer):
    messages = [
        {"role": "system", "content": "the assistant answers"},
        {"role": "user", "content": "the user asks"},
        {"role": "assistant", "content": "plain words answer"},
        {"role": "user", "content": "and asks"},
        {"role": "assistant", "content": "the answer"},
    ]
    ids, mask = tokenize_conversation(chat_tokenizer, messages, max_length=1000)
    assert ids.shape == mask.shape
    decode = chat_tokenizer.decode
    assert decode(ids[mask]) == "plain words answer<|im_end|>the answer<|im_end|>"
    unmasked = decode(ids[~mask])
    assert "the user asks" in unmasked and "plain" not in unmasked
    # Truncation keeps the mask aligned with the ids.
    short_ids, short_mask = tokenize_conversation(chat_tokenizer, messages, max_length=12)
    assert len(short_ids) == 12 and (short_mask == mask[:12]).all()


def test_missing_package_says_how_to_install():
    from torchspec_ext._packaged import packaged_file

    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg==1"):
        packaged_file("no_such_module_here", "x.json", "no-such-pkg==1", "data", "pass your own file")
    with pytest.raises(FileNotFoundError, match="is missing: reinstall pytest"):
        packaged_file("pytest", "no/such/file", "pytest", "data", "pass your own file")


def test_pad_rows_pads_right_or_left():
    import torch

    from torchspec_ext.data import pad_rows

    assert pad_rows([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad_rows([[1, 2, 3], [4], []], 9, left=True).tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    mask = pad_rows([torch.tensor([True, False]), torch.tensor([True])], False, dtype=torch.bool)
    assert mask.dtype == torch.bool and mask.tolist() == [[True, False], [True, False]]
