"""Prompt lookup: a proposer with no model and no training. It finds the most recent earlier
occurrence of the context's last n tokens (n from ``MAX_NGRAM`` down to 1) in the context itself
(the prompt and the output so far) and proposes the tokens that followed it, as a chain."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from torchspec_ext.drafts.base import DraftFamily
from torchspec_ext.speculate import ScoredTree, TreeSpec

MAX_NGRAM = 3
# The chance each looked-up token is the target's, per n-gram length matched, before any is observed.
LOOKUP_PRIOR = (0.4, 0.55, 0.7)


def lookup_continuation(context: Sequence[int], max_tokens: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to ``max_tokens`` tokens that followed the latest earlier match of the longest suffix of
    ``context`` (at most ``max_ngram`` tokens) that occurs earlier; [] when none does."""
    return lookup_match(context, max_tokens, max_ngram)[0]


def lookup_match(context: Sequence[int], max_tokens: int, max_ngram: int = MAX_NGRAM) -> tuple[list[int], int]:
    """(:func:`lookup_continuation`'s tokens, the length of the suffix matched; 0 when none)."""
    n_ctx = len(context)
    for n in range(min(max_ngram, n_ctx - 1), 0, -1):
        suffix = list(context[n_ctx - n :])
        for start in range(n_ctx - n - 1, -1, -1):  # latest first; the suffix itself excluded
            if list(context[start : start + n]) == suffix:
                follow = list(context[start + n : start + n + max_tokens])
                if follow:
                    return follow, n
    return [], 0


class PromptLookup:
    """The proposer: a chain of up to ``max_tokens`` looked-up tokens."""

    feature_layers: Sequence[int] = ()

    def __init__(self, max_tokens: int, max_ngram: int = MAX_NGRAM):
        self.max_tokens, self.max_ngram = max_tokens, max_ngram

    def reset(self, features: Tensor | None) -> None:
        pass

    def observe(self, features: Tensor | None) -> None:
        pass

    def propose(self, context: Sequence[int]) -> tuple[Tensor, Tensor]:
        chain = [context[-1], *lookup_continuation(context, self.max_tokens, self.max_ngram)]
        return torch.tensor(chain, dtype=torch.long), torch.arange(-1, len(chain) - 1, dtype=torch.long)

    def propose_scored(self, context: Sequence[int]) -> ScoredTree:
        """The chain, each token's confidence tracked by (n-gram length matched, depth): a lookup knows
        nothing of how often its continuation was seen; its prior is a guess the calibration replaces."""
        follow, n = lookup_match(context, self.max_tokens, self.max_ngram)
        prior = [LOOKUP_PRIOR[min(n, len(LOOKUP_PRIOR)) - 1] ** d for d in range(1, len(follow) + 1)]
        return ScoredTree.chain(context[-1], follow, prior, [(n, min(d, 8)) for d in range(1, len(follow) + 1)])


class PromptLookupFamily(DraftFamily):
    name = "lookup"
    title = "prompt lookup"
    trainable = False

    def proposer(self, draft, spec: TreeSpec) -> PromptLookup:
        return PromptLookup(spec.max_nodes)

    def decode_modes(self, depth: int, topk: int, max_nodes: int, min_prob: float) -> dict[str, TreeSpec]:
        return {"lookup": TreeSpec.chain(depth)}
