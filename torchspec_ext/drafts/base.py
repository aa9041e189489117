"""What every draft family is: the interface ``train``, ``eval``, ``export`` and ``speculate`` use, so
that none of them names a family.

A family says what its draft reads from the teacher (``draft.feature_layers``, and its vocabulary
through ``draft.target_to_draft()``), how a new draft is built and initialised from the target, its
training objective (the draft module's ``forward(batch, loss, options)``), how it proposes tokens
while decoding (:meth:`DraftFamily.proposer`), and how it is saved, exported and loaded. A family
without training (prompt lookup) only proposes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from torchspec_ext.speculate import Proposer, TreeSpec, decode_modes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# (hidden [N, H], weight [V, H], teacher ids [N, k], teacher log-probs [N, k]) -> (loss, argmax [N], lse [N])
LossFunction = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


@dataclass
class Objective:
    """A draft's training objective on one batch: the loss to minimise and, per predicted position
    kind (EAGLE-3: unroll step; DFlash: offset in the block), its loss and its accuracy against the
    teacher's argmax; ``tokens``: the positions the first kind was trained on."""

    total: Tensor
    losses: list[Tensor]
    accuracies: list[float]
    tokens: int


class DraftLoadError(ValueError):
    """A folder that is not a draft of the family asked for (the message names what it is)."""


class DraftFamily:
    """A kind of draft. Subclasses set the class attributes and implement the methods; a trainable
    family's draft is an ``nn.Module`` with ``config`` (``vocab_size``, ``hidden_size``,
    ``feature_layers``), ``feature_layers``, ``draft_to_target()``, ``target_to_draft()``,
    ``forward(batch, loss, options) -> Objective``, ``trained_state()`` and
    ``save(directory, dtype=None, private=True)``."""

    name: ClassVar[str]  # the registry's key, what --draft-family takes
    title: ClassVar[str]  # for people
    trainable: ClassVar[bool] = True
    architectures: ClassVar[tuple[str, ...]] = ()  # the config.json "architectures" this family loads
    Options: ClassVar[type | None] = None  # a dataclass of the family's training options (torchspec_ext.options)

    def new_draft(self, target, token_sample: Sequence[tuple[Tensor, Tensor]], options) -> nn.Module:
        """A draft for ``target``, initialised from it; ``token_sample``: (ids, loss mask) of some
        training conversations (to choose a vocabulary, where the family has its own)."""
        raise NotImplementedError

    def config_from(self, config: dict):
        """The draft's config (with ``vocab_size``, ``hidden_size``, ``feature_layers``) from its
        config.json, before any weight is read."""
        raise NotImplementedError

    def untrained_draft(self, target):
        """What a family without training proposes from (None: nothing but the context)."""
        return None

    def load(self, directory: Path, target=None) -> nn.Module:
        """A draft saved by training or export (embeddings from ``target`` where it has them)."""
        raise NotImplementedError

    def proposer(self, draft: nn.Module | None, spec: TreeSpec) -> Proposer:
        """The proposer that decodes with ``draft`` (on the target's device and dtype) in ``spec``'s shape."""
        raise NotImplementedError

    def decode_modes(self, depth: int, topk: int, max_nodes: int, min_prob: float) -> dict[str, TreeSpec]:
        """The proposal shapes an evaluation of this family measures."""
        return decode_modes(depth, topk, max_nodes, min_prob)

    def fit_modes(self, draft: nn.Module | None, modes: dict[str, TreeSpec]) -> dict[str, TreeSpec]:
        """``modes`` in the shape ``draft``'s proposer gives them (a family whose draft bounds a
        proposal, as a block does, caps them; reports count draft positions by these)."""
        return modes

    def export_problems(self, draft: nn.Module) -> tuple[list[str], list[str]]:
        """(errors, warnings) of exporting ``draft`` for the serving engines."""
        return [], []

    def options(self, values: dict):
        """The family's options from a dict of option values (defaults for the ones missing)."""
        from torchspec_ext.options import fill

        return fill(self.Options, values) if self.Options is not None else None


def read_config(directory: Path) -> dict:
    """A draft folder's config.json, with a DraftLoadError naming the problem."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise DraftLoadError(f"{directory} holds no draft ({CONFIG_NAME} and {WEIGHTS_NAME} expected)")
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except ValueError as exc:
        raise DraftLoadError(f"{directory} is not a readable draft: unreadable {CONFIG_NAME} ({exc})") from None
    if not isinstance(config, dict):
        raise DraftLoadError(f"{directory}: {CONFIG_NAME} is not a JSON object")
    return config


def save_weights(directory: Path, state: dict[str, Tensor], config: dict, dtype: torch.dtype | None) -> None:
    """config.json and model.safetensors in ``directory``; floating-point tensors cast to ``dtype``
    if given (integer and boolean tensors keep theirs)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cast = {}
    for k, v in state.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        cast[k] = v.contiguous().cpu()
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file(cast, str(directory / WEIGHTS_NAME))


def load_weights(module: nn.Module, directory: Path, state: dict[str, Tensor], frozen: Sequence[str], what: str):
    """Loads ``state`` into ``module``; only the ``frozen`` tensors (the target's) may be missing."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise DraftLoadError(f"{directory}: not a compatible {what} draft ({exc})".replace("\n", " ")) from None
    if unexpected or set(missing) - set(frozen):
        raise DraftLoadError(f"{directory}: not a compatible {what} draft (missing {missing}, unexpected {unexpected})")


# A chat rendered with the template a draft was trained with: serving must render it the same way.
PROBE_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi there."},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]


def chat_probe(tokenizer) -> str:
    """:data:`PROBE_CHAT` in ``tokenizer``'s chat template, ready for the assistant's reply: where two
    templates (or a thinking-mode switch) differ, their probes differ."""
    return tokenizer.apply_chat_template(PROBE_CHAT, add_generation_prompt=True, tokenize=False)


def training_metadata(tokenizer, target: str | None, target_dtype: str, loss: str, responses: str) -> dict:
    """What a draft records of its training (config.json's "training", kept by export): the chat
    template its data was rendered with (and the probe chat rendered with it), the target and dtype."""
    return {
        "chat_template": tokenizer.chat_template,
        "chat_probe": chat_probe(tokenizer),
        "target": target or "default",
        "target_dtype": target_dtype,
        "loss": loss,
        "responses": responses,
    }
