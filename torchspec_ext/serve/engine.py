"""The engine interface: what the HTTP layer and the learner need from whatever decodes.

The HTTP layer needs to run a request (:class:`GenerationRequest`) and see its tokens as they are
verified, with a way to stop it (a client gone, a stop string met); the learner needs what the
target computed for the request (:class:`Verified`: the target's features and logits at every
committed position, and the prompt's prefill) and a way to put new draft weights in between
requests. :class:`Engine` is that contract; :class:`LocalEngine`, our in-process speculative
decoder, is its first implementation. docs/serving.md says what a vLLM or SGLang adapter needs.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from torchspec_ext.drafts.combined import CombinationSpec, Combined, build_proposer, output_caches
from torchspec_ext.speculate import DecodingSequence, SpeculativeBatch, TreeSpec


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
    """What serving needs from a decoder, all called from one worker thread: ``begin`` starts a request
    (its prefill) beside those running, ``step`` advances every running request by one verification and
    returns those that ended, ``abort`` ends them all (after a failed step); ``update_draft`` puts in new
    draft weights for the requests that begin after it, never inside one."""

    model_name: str
    tokenizer: object
    context_length: int  # prompt + generated tokens
    vocab_size: int
    stop_token_ids: list[int]
    feature_layers: list[int]  # what ``Verified.features`` holds (Hugging Face hidden_states indices)
    running: int  # requests begun and not ended

    def begin(self, request: GenerationRequest, on_tokens: TokenSink, on_verified: VerifiedSink | None = None): ...

    def step(self) -> list: ...

    def abort(self) -> list: ...

    def trainable_draft(self) -> tuple[object, torch.nn.Module] | None:
        """(family, the draft module being served) where the draft can learn, else None."""
        ...

    def update_draft(self, state: dict[str, Tensor], version: int) -> None: ...


@dataclass
class Running:
    """A request being decoded by a :class:`LocalEngine`: its sequence in the batch and its stats."""

    sequence: DecodingSequence
    stats: GenerationStats

    @property
    def done(self) -> bool:
        return self.sequence.done


class LocalEngine:
    """Speculative decoding in this process with a draft of any family, in the proposal shape ``spec``:
    a TreeSpec (the draft alone) or a CombinationSpec (the draft's tree, prompt lookup and suffix
    decoding verified together, ``drafts.combined``; the suffix cache holds every request's output and
    the calibration learns from every request, shared by all of them, and both outlive draft updates).

    Requests decode together (:class:`~torchspec_ext.speculate.SpeculativeBatch`): :meth:`begin` adds
    one, each :meth:`step` verifies every running request's tree in one target forward. Each request
    has a proposer of its own, made from the draft weights current when it began; an update puts in
    new weights for the requests that begin after it, so no request changes draft midway."""

    def __init__(
        self, target, tokenizer, family, draft, spec: TreeSpec | CombinationSpec, model_name: str,
        stop_token_ids: list[int],
    ):  # fmt: skip
        self.target, self.tokenizer, self.family, self.draft, self.spec = target, tokenizer, family, draft, spec
        self.model_name = model_name
        self.stop_token_ids = list(stop_token_ids)
        self.context_length = int(getattr(target.config, "max_position_embeddings", None) or 2048)
        self.vocab_size = int(target.config.vocab_size)
        self.proposer = build_proposer(family, draft, spec)  # the shared parts: calibration, suffix cache
        self.outputs = output_caches(self.proposer)  # what each finished request's tokens are added to
        self.feature_layers = list(self.proposer.feature_layers)
        self.version = 0
        self.batch = SpeculativeBatch(target)
        self._running: list[Running] = []
        self._lock = threading.Lock()  # begin, step and update_draft are one thread's, but keep them exclusive

    @property
    def running(self) -> int:
        return len(self._running)

    def trainable_draft(self):
        if isinstance(self.draft, torch.nn.Module) and self.family.trainable:
            return self.family, self.draft
        return None

    @torch.no_grad()
    def update_draft(self, state: dict[str, Tensor], version: int) -> None:
        with self._lock:
            draft = copy.deepcopy(self.draft)  # running requests keep the weights they began with
            weight = next(draft.parameters())
            moved = {
                k: v.to(weight.device, v.dtype if not v.is_floating_point() else weight.dtype) for k, v in state.items()
            }
            missing, unexpected = draft.load_state_dict(moved, strict=False)
            if unexpected or any(k in state for k in missing):
                raise RuntimeError(f"draft update does not fit the served draft (unexpected {unexpected})")
            self.draft, self.version = draft, version

    def _sequence_proposer(self, seeded_sample: bool):
        """A proposer for one more request: the draft's own (it keeps the request's state), in a
        combination beside the shared members (prompt lookup and suffix decoding keep none) and calibration.
        A seeded sample gets a combination of its own (an empty suffix cache, a new calibration): its
        tokens depend on the proposals, which then depend on nothing another request changes."""
        if not isinstance(self.spec, CombinationSpec):
            return self.family.proposer(self.draft, self.spec)
        if seeded_sample:
            return build_proposer(self.family, self.draft, self.spec)
        shared = self.proposer
        members = list(shared.proposers)
        if self.spec.tree is not None:  # the draft is the first member
            members[0] = self.family.proposer(self.draft, self.spec.tree)
        return Combined(members, shared.max_nodes, shared.node_cost, names=shared.names,
                        calibration=shared.calibration, min_confidence=shared.min_confidence)  # fmt: skip

    def begin(
        self, request: GenerationRequest, on_tokens: TokenSink, on_verified: VerifiedSink | None = None
    ) -> Running:
        """Prefills ``request`` and adds it to the running batch; ``on_tokens`` and ``on_verified`` are
        called from :meth:`step` (``on_verified`` first with the prefill, here)."""
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
        seeded_sample = request.temperature > 0 and request.seed is not None
        with self._lock:
            sequence = self.batch.add(
                self._sequence_proposer(seeded_sample), request.prompt, request.max_tokens, request.temperature,
                self.stop_token_ids, generator=generator, on_step=on_step,
            )  # fmt: skip
            running = Running(sequence, stats)
            if running.done:
                self._finish(running)
            else:
                self._running.append(running)
        return running

    def step(self) -> list[Running]:
        """One verification of every running request; returns those that ended."""
        with self._lock:
            self.batch.step()
            ended = [r for r in self._running if r.done]
            self._running = [r for r in self._running if not r.done]
            for r in ended:
                self._finish(r)
        return ended

    def abort(self) -> list[Running]:
        """Ends every running request where it is (after a step failed): returns them."""
        with self._lock:
            ended, self._running = self._running, []
            self.batch = SpeculativeBatch(self.target)
        return ended

    def _finish(self, running: Running) -> None:
        result = running.sequence.result
        for cache in self.outputs:
            cache.add(result.tokens)
        running.stats.tokens, running.stats.target_forwards = result.tokens, result.target_forwards
        running.stats.seconds = result.seconds

    def generate(
        self, request: GenerationRequest, on_tokens: TokenSink, on_verified: VerifiedSink | None = None
    ) -> GenerationStats:
        """``request`` decoded to its end (with any other running requests beside it)."""
        running = self.begin(request, on_tokens, on_verified)
        while not running.done:
            self.step()
        return running.stats
