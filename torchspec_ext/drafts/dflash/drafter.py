"""Decoding with a DFlash / DSpark draft: :class:`DFlashDrafter` (one block forward per proposal, the
context's keys and values kept per layer in buffers that grow with the committed tokens), and DSpark's
proposal cut by its confidence head (:class:`ConfidenceChain`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from torchspec_ext.drafts.dflash.model import DFlashDraft, rope_tables
from torchspec_ext.speculate import TreeSpec


class DFlashDrafter:
    """A :class:`DFlashDraft` behind the decoder's ``StepDraft`` interface: one block forward per
    context, whatever the number of paths asked about.

    ``speculative_generate`` hands it the target's features of every committed token but the last
    (``reset`` after the prefill, ``observe`` after each verification); each layer's context keys and
    values live in buffers that grow by doubling, so a round computes only the newly committed
    tokens and the block. ``next_logprobs(context, paths)`` returns, per path, the log-probabilities of
    the slot that predicts the token after ``context + path`` (DFlash: slot ``len(path) + 1``; DSpark:
    slot ``len(path)`` with the Markov bias of the path's last token, the anchor's for an empty path).
    """

    def __init__(self, draft: DFlashDraft):
        self.draft = draft.eval()
        self.config = draft.config
        self.feature_layers = list(draft.config.feature_layers)
        self.device = draft.fc.weight.device
        self.dtype = draft.fc.weight.dtype
        self.reset(torch.empty(0, draft.fc.in_features, device=self.device))

    def reset(self, features: Tensor) -> None:
        """Start a new sequence whose first ``len(features)`` tokens the target has seen."""
        c = self.config
        self.pending = features.to(self.device, self.dtype)
        self.length = 0  # context positions whose keys are in the buffers
        shape = (c.num_hidden_layers, c.num_key_value_heads, 64, c.head_dim)
        self.keys = torch.empty(shape, device=self.device, dtype=self.dtype)
        self.values = torch.empty_like(self.keys)
        self.block_context = -1
        self.hidden = self.logits = None

    def observe(self, features: Tensor) -> None:
        """The target's features of newly committed tokens, in order."""
        self.pending = torch.cat([self.pending, features.to(self.pending)])

    def _grow(self, need: int) -> None:
        if need > self.keys.shape[2]:
            size = max(need, 2 * self.keys.shape[2])
            keys = self.keys.new_empty(self.keys.shape[:2] + (size, self.keys.shape[-1]))
            values = torch.empty_like(keys)
            keys[:, :, : self.length], values[:, :, : self.length] = (
                self.keys[:, :, : self.length],
                self.values[:, :, : self.length],
            )
            self.keys, self.values = keys, values

    @torch.no_grad()
    def _extend_context(self, context) -> None:
        n, done = len(context), self.length
        if done + self.pending.shape[0] != n - 1:
            raise RuntimeError(
                f"DFlashDrafter: {done + self.pending.shape[0]} feature rows for a context of {n} tokens "
                f"({n - 1} expected); speculative_generate feeds them"
            )
        if done == n - 1:
            return
        c, d = self.config, self.draft
        hidden = d.context(self.pending)
        cos, sin = rope_tables(torch.arange(done, n - 1, device=self.device), c.head_dim, c.rope_theta, hidden.dtype)
        self._grow(n - 1)
        for i, layer in enumerate(d.layers):
            k, v = layer.self_attn.context_kv(hidden, cos, sin)  # [kv, new, D]
            self.keys[i, :, done : n - 1], self.values[i, :, done : n - 1] = k, v
        self.length, self.pending = n - 1, self.pending[:0]

    @torch.no_grad()
    def _run_block(self, context) -> None:
        """The block after ``context``: its normed hidden states ``[B, H]`` and base logits ``[B, V]``."""
        c, d = self.config, self.draft
        anchor = len(context) - 1
        ids = torch.full((1, 1, c.block_size), c.mask_token_id, dtype=torch.long, device=self.device)
        ids[0, 0, 0] = context[-1]
        positions = anchor + torch.arange(c.block_size, device=self.device)[None, None]
        anchors = torch.full((1, 1), anchor, dtype=torch.long, device=self.device)
        allowed = d.attention_masks(anchors, anchor)
        allowed[False] = (None, None)  # every context key is before the anchor
        x = d.embed_tokens(ids)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, x.dtype)
        for i, layer in enumerate(d.layers):
            kc, vc = self.keys[i : i + 1, :, :anchor], self.values[i : i + 1, :, :anchor]
            x = layer(x, cos, sin, kc, vc, *allowed[layer.sliding])
        self.hidden = d.norm(x)[0, 0]
        self.logits = d.lm_head(self.hidden).float()
        self.block_context = len(context)

    def _prepare(self, context) -> None:
        self._extend_context(context)
        if self.block_context != len(context):
            self._run_block(context)

    def _slots(self, context, paths) -> tuple[Tensor, Tensor]:
        """(slot [P], previous token [P]) of each path."""
        c = self.config
        lengths = [len(p) for p in paths]
        if max(lengths, default=0) >= c.proposals:
            raise ValueError(
                f"a {'DSpark' if c.is_dspark else 'DFlash'} block of {c.block_size} proposes {c.proposals} tokens; "
                f"a path of {max(lengths)} asks for the next one (cap the proposal's depth)"
            )
        shift = 0 if c.sample_from_anchor else 1
        slots = torch.tensor([n + shift for n in lengths], device=self.device)
        previous = torch.tensor([p[-1] if len(p) else context[-1] for p in paths], device=self.device)
        return slots, previous

    @torch.no_grad()
    def next_logprobs(self, context, paths) -> Tensor:
        self._prepare(context)
        slots, previous = self._slots(context, [list(p) for p in paths])
        logits = self.logits[slots]
        markov = self.draft.markov_head
        if markov is not None:
            logits = logits + markov.markov_w2(markov.markov_w1(previous)).float()
        return torch.log_softmax(logits, -1)

    @torch.no_grad()
    def confidence(self, context, paths) -> Tensor:
        """DSpark: the head's probability ``[P]`` that the token after each path is accepted."""
        head = self.draft.confidence_head
        if head is None:
            raise ValueError("this draft has no confidence head")
        self._prepare(context)
        slots, previous = self._slots(context, [list(p) for p in paths])
        features = self.hidden[slots]
        if self.draft.markov_head is not None:
            features = torch.cat([features, self.draft.markov_head.markov_w1(previous).to(features)], -1)
        return torch.sigmoid(head.proj(features).squeeze(-1).float())


@dataclass
class ConfidenceSpec(TreeSpec):
    """DSpark's proposal: a greedy chain of up to ``depth`` tokens, cut where the confidence head's
    cumulative probability of acceptance falls below ``min_confidence`` (the first token is always
    proposed: verifying it costs next to nothing)."""

    min_confidence: float = 0.5


class ConfidenceChain:
    """The proposer of a :class:`ConfidenceSpec`."""

    def __init__(self, drafter: DFlashDrafter, spec: ConfidenceSpec):
        self.drafter, self.spec = drafter, spec
        self.feature_layers = drafter.feature_layers

    def reset(self, features: Tensor | None) -> None:
        self.drafter.reset(features)

    def observe(self, features: Tensor | None) -> None:
        self.drafter.observe(features)

    def propose(self, context) -> tuple[Tensor, Tensor]:
        path, expected = [], 1.0
        for _ in range(min(self.spec.depth, self.drafter.config.proposals)):
            expected *= float(self.drafter.confidence(context, [path])[0])
            if path and expected < self.spec.min_confidence:
                break
            path.append(int(self.drafter.next_logprobs(context, [path])[0].argmax()))
        tokens = torch.tensor([context[-1], *path], dtype=torch.long)
        return tokens, torch.arange(-1, len(path), dtype=torch.long)
