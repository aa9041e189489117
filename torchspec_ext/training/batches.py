"""Token batches of conversations, in a seeded order per epoch that a resumed run repeats."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import Tensor

from torchspec_ext.data import first_turn_prompt, pad_rows, tokenize_conversation
from torchspec_ext.training.errors import TrainError


def epoch_order(count: int, key: int | str) -> list[int]:
    """``range(count)`` shuffled by a generator seeded with ``key`` (the same on every rank and resume)."""
    order = list(range(count))
    random.Random(key).shuffle(order)
    return order


class Batches:
    """Token batches of ``batch_size`` conversations in a seeded order per epoch: batch ``i`` is the
    ``i % per_epoch``-th of epoch ``i // per_epoch``'s order, the same in every run with the seed."""

    def __init__(self, conversations, tokenizer, batch_size: int, max_length: int, seed: int):
        self.conversations = conversations
        self.tokenizer = tokenizer
        self.batch_size = min(batch_size, len(conversations))
        self.max_length = max_length
        self.seed = seed
        self.per_epoch = len(conversations) // self.batch_size

    def __len__(self) -> int:
        return self.per_epoch

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return (pad if pad is not None else self.tokenizer.eos_token_id) or 0

    def _order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.conversations), self.seed * 1000003 + epoch)

    def conversations_of(self, i: int) -> list:
        """The conversations of batch ``i``."""
        epoch, j = divmod(i, self.per_epoch)
        chosen = self._order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        return [self.conversations[c] for c in chosen]

    def prompts(self, i: int, max_prompt: int) -> tuple[int, list[list[int]]]:
        """(``i``, prompts): batch ``i``'s conversations' first user turns in the chat template,
        ready for the assistant's reply (their last ``max_prompt`` tokens when longer)."""
        return i, [first_turn_prompt(self.tokenizer, c)[-max_prompt:] for c in self.conversations_of(i)]

    def tokens(self, i: int) -> tuple[int, Tensor, Tensor]:
        """(``i``, input_ids [B, T], loss_mask [B, T]) of batch ``i``, right-padded with the pad (else EOS) id."""
        pairs = [tokenize_conversation(self.tokenizer, c, self.max_length) for c in self.conversations_of(i)]
        ids = pad_rows([ids for ids, _ in pairs], self.pad_id)
        mask = pad_rows([mask for _, mask in pairs], False, dtype=torch.bool)
        return i, ids, mask


def prepare_tokenizer(tokenizer, chat_template: str | None) -> None:
    """Sets ``chat_template`` (a Jinja file) on the tokenizer; a TrainError when it has none."""
    if chat_template:
        path = Path(chat_template)
        if not path.is_file():
            raise TrainError(f"--chat-template {path}: no such file")
        tokenizer.chat_template = path.read_text()
    if not getattr(tokenizer, "chat_template", None):
        raise TrainError(
            "the target's tokenizer has no chat template, so conversations cannot be formatted: "
            "pass --chat-template FILE (a Jinja template) or use an instruction-tuned target"
        )
