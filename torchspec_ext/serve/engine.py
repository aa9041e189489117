"""The engine interface: what the HTTP layer and the learner need from whatever decodes.

The HTTP layer needs to run a request (:class:`GenerationRequest`) and see its tokens as they are
verified, with a way to stop it (a client gone, a stop string met); the learner needs what the
target computed for the request (:class:`Verified`: the target's features and logits at every
committed position, and the prompt's prefill) and a way to put new draft weights in between
requests. :class:`Engine` is that contract; :class:`LocalEngine`, our in-process speculative
decoder, is its first implementation. docs/serving.md says what a vLLM or SGLang adapter needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from torchspec_ext.drafts.combined import CombinationSpec, build_proposer, output_caches
from torchspec_ext.speculate import TreeSpec, speculative_generate


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate: ``prompt`` token ids, up to ``max_tokens`` new ones; temperature 0
    is greedy; ``seed`` makes sampling reproducible (None: a fresh random seed)."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None


@dataclass
class Verified:
    """What the target computed at ``len(tokens)`` committed positions: ``features [n, F]`` (its hidden
    states at the draft's feature layers; None for a draft that reads none) and ``logits [n, V]`` at
    the positions whose next token is ``tokens[i]``. ``prefill``: the prompt's positions (all but
    the last prompt token, which the first verification scores), else one verification's."""

    tokens: list[int]
    features: Tensor | None
    logits: Tensor
    prefill: bool


@dataclass
class GenerationStats:
    tokens: list[int] = field(default_factory=list)  # generated, through the stop token if one was met
    target_forwards: int = 0  # verification passes (the prefill not counted)
    seconds: float = 0.0  # prefill and decoding
    draft_version: int = 0  # the draft weights' version this request was decoded with
    stopped: bool = False  # ended by on_tokens (stop string, cancellation), not by a stop token or max_tokens

    @property
    def acceptance_length(self) -> float:
        return len(self.tokens) / max(1, self.target_forwards)


TokenSink = Callable[[list[int]], bool]  # new tokens -> True to stop the generation
VerifiedSink = Callable[[Verified], None]


class Engine(Protocol):
    """What serving needs from a decoder. ``generate`` is blocking and runs in one worker thread;
    ``update_draft`` is called by that same thread between requests, never inside one."""

    model_name: str
    tokenizer: object
    context_length: int  # prompt + generated tokens
    vocab_size: int
    stop_token_ids: list[int]
    feature_layers: list[int]  # what ``Verified.features`` holds (Hugging Face hidden_states indices)

    def generate(
        self, request: GenerationRequest, on_tokens: TokenSink, on_verified: VerifiedSink | None = None
    ) -> GenerationStats: ...

    def trainable_draft(self) -> tuple[object, torch.nn.Module] | None:
        """(family, the draft module being served) where the draft can learn, else None."""
        ...

    def update_draft(self, state: dict[str, Tensor], version: int) -> None: ...


class LocalEngine:
    """Speculative decoding in this process (:func:`~torchspec_ext.speculate.speculative_generate`)
    with a draft of any family, in the proposal shape ``spec``: a TreeSpec (the draft alone) or a
    CombinationSpec (the draft's tree, prompt lookup and suffix decoding verified together,
    ``drafts.combined``; the suffix cache holds every request's output and the calibration learns
    from every request, shared by all of them, and both outlive draft updates)."""

    def __init__(
        self, target, tokenizer, family, draft, spec: TreeSpec | CombinationSpec, model_name: str,
        stop_token_ids: list[int],
    ):  # fmt: skip
        self.target, self.tokenizer, self.family, self.draft, self.spec = target, tokenizer, family, draft, spec
        self.model_name = model_name
        self.stop_token_ids = list(stop_token_ids)
        self.context_length = int(getattr(target.config, "max_position_embeddings", None) or 2048)
        self.vocab_size = int(target.config.vocab_size)
        self.proposer = build_proposer(family, draft, spec)
        self.outputs = output_caches(self.proposer)  # what each finished request's tokens are added to
        self.feature_layers = list(self.proposer.feature_layers)
        self.version = 0
        self._lock = threading.Lock()  # generate and update_draft are one thread's, but keep them exclusive

    def trainable_draft(self):
        if isinstance(self.draft, torch.nn.Module) and self.family.trainable:
            return self.family, self.draft
        return None

    @torch.no_grad()
    def update_draft(self, state: dict[str, Tensor], version: int) -> None:
        with self._lock:
            weight = next(self.draft.parameters())
            moved = {
                k: v.to(weight.device, v.dtype if not v.is_floating_point() else weight.dtype) for k, v in state.items()
            }
            missing, unexpected = self.draft.load_state_dict(moved, strict=False)
            if unexpected or any(k in state for k in missing):
                raise RuntimeError(f"draft update does not fit the served draft (unexpected {unexpected})")
            if isinstance(self.spec, CombinationSpec):  # the draft is the first member (a trainable family)
                self.proposer.proposers[0] = self.family.proposer(self.draft, self.spec.tree)
            else:
                self.proposer = self.family.proposer(self.draft, self.spec)
            self.version = version

    def generate(
        self, request: GenerationRequest, on_tokens: TokenSink, on_verified: VerifiedSink | None = None
    ) -> GenerationStats:
        stats = GenerationStats(draft_version=self.version)
        first = [True]

        def on_step(tokens, features, logits) -> bool:
            prefill, first[0] = first[0], False
            if on_verified is not None:
                on_verified(Verified(list(tokens), features, logits, prefill))
            if prefill:
                return False
            stop = bool(on_tokens(list(tokens)))
            stats.stopped = stats.stopped or stop
            return stop

        generator = torch.Generator(device=next(self.target.parameters()).device)
        generator.manual_seed(request.seed if request.seed is not None else torch.seed())
        with self._lock:
            result = speculative_generate(
                self.target,
                self.proposer,
                request.prompt,
                request.max_tokens,
                request.temperature,
                self.stop_token_ids,
                generator=generator,
                on_step=on_step,
            )
            for cache in self.outputs:
                cache.add(result.tokens)
        stats.tokens, stats.target_forwards, stats.seconds = result.tokens, result.target_forwards, result.seconds
        return stats
