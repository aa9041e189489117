"""Suffix decoding: a proposer with no model and no training, after SuffixDecoding (Oliaro et al., 2024,
arXiv 2411.04975) as Snowflake's Arctic Inference serves it; our own implementation.

Each step the longest suffixes of the context (its last ``m`` tokens, ``m`` up to ``max_pattern``) are
looked up in two sources: the request's own tokens (the prompt and the output so far) and a
:class:`SuffixCache` of earlier outputs (one per server, one per evaluation run). Every earlier
occurrence of the pattern votes for what followed it: a continuation's probability is the share of the
occurrences it follows, so the proposal is a tree of the most frequent continuations. The method's
adaptive length: a match of ``m`` tokens may propose at most ``alpha * m + offset`` tokens (longer
matches are trusted further), none below ``min_prob``; among the match lengths, and then the two
sources, the proposal whose summed probabilities (its expected accepted tokens) are highest wins.

Occurrences are found without a suffix tree: the cache is one array of token ids (outputs separated by
-1) with an index sorted by token id, the request's tokens an array scanned directly; the last token's
most recent ``max_occurrences`` positions are extended backwards to measure each match's length and
forwards to read its continuation, in numpy. The cache holds at most ``max_tokens`` tokens (whole
outputs evicted first in, first out) in 12 bytes a token: the ids, the sorted ids and their positions,
all int32 (3 MiB at the default 262,144 tokens; twice that for a moment while an added output is indexed).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from torchspec_ext.drafts.base import DraftFamily
from torchspec_ext.speculate import ScoredTree, TreeSpec

SEP = -1  # between outputs in the cache, and past the end of any sequence


@dataclass
class Speculation:
    """A suffix-decoding proposal: ``tokens``, ``parents`` (node 0 the root, which is not among the
    tokens: ``parents`` index ``[root, *tokens]``), ``probs`` (each node's share of the occurrences),
    ``support`` (the occurrences it was counted over), ``match`` (the pattern's length), ``score``
    (the summed probabilities) and ``source`` ("request" or "cache")."""

    tokens: list[int]
    parents: list[int]
    probs: list[float]
    support: int
    match: int
    score: float
    source: str


class SuffixCache:
    """A bounded cache of earlier outputs that :class:`SuffixDecoding` proposers share (thread-safe:
    a server's requests add to it while others read). ``add`` one finished output at a time."""

    def __init__(self, max_tokens: int = 1 << 18):
        if max_tokens < 1:
            raise ValueError(f"SuffixCache: max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._lengths: deque[int] = deque()  # of the outputs held, oldest first
        self._total = 0  # their sum
        self._flat = np.empty(0, np.int32)  # each output followed by SEP
        self._index: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, tokens: Sequence[int]) -> None:
        """Caches an output (its last ``max_tokens`` tokens), evicting the oldest outputs to fit."""
        tokens = np.asarray(list(tokens)[-self.max_tokens :], dtype=np.int32)
        if len(tokens) == 0:
            return
        with self._lock:
            self._lengths.append(len(tokens))
            self._total += len(tokens)
            drop = 0
            while self._total > self.max_tokens:
                evicted = self._lengths.popleft()
                self._total -= evicted
                drop += evicted + 1
            self._flat = np.concatenate([self._flat[drop:], tokens, np.array([SEP], np.int32)])
            self._index = None

    def clear(self) -> None:
        with self._lock:
            self._lengths.clear()
            self._total = 0
            self._flat, self._index = np.empty(0, np.int32), None

    @property
    def tokens(self) -> int:
        """Tokens cached."""
        return self._total

    @property
    def outputs(self) -> int:
        return len(self._lengths)

    @property
    def nbytes(self) -> int:
        """Bytes the cache's arrays hold now (the index counted once built)."""
        index = self._index
        return self._flat.nbytes + (index[1].nbytes + index[2].nbytes if index is not None else 0)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids with separators, the ids sorted, their positions): immutable arrays for one lookup."""
        with self._lock:
            if self._index is None:
                order = np.argsort(self._flat, kind="stable").astype(np.int32)  # equal ids: positions ascending
                self._index = (self._flat, self._flat[order], order)
            return self._index


def occurrences_in_cache(index, token: int, limit: int) -> np.ndarray:
    """The ``limit`` latest positions of ``token`` in a :meth:`SuffixCache.snapshot`, ascending."""
    _, ids, order = index
    lo, hi = np.searchsorted(ids, token, "left"), np.searchsorted(ids, token, "right")
    return order[max(lo, hi - limit) : hi].astype(np.int64)


def speculate(
    flat: np.ndarray,
    positions: np.ndarray,
    pattern: np.ndarray,
    max_spec: int,
    alpha: float,
    offset: float,
    min_prob: float,
    source: str = "",
) -> Speculation | None:
    """The best proposal from the occurrences of ``pattern[-1]`` at ``positions`` of ``flat`` (ids,
    SEP between sequences; the pattern's own position excluded), or None when none reaches ``min_prob``."""
    if len(positions) == 0 or max_spec < 1:
        return None
    m_max = len(pattern)
    # Match length of each occurrence: 1 + the tokens before it that agree with the pattern's.
    if m_max > 1:
        back = positions[:, None] - np.arange(1, m_max)[None, :]
        before = np.where(back >= 0, flat[np.maximum(back, 0)], SEP)
        agree = before == pattern[-2::-1][None, :]
        lengths = 1 + np.cumprod(agree, axis=1).sum(1)
    else:
        lengths = np.ones(len(positions), np.int64)
    spec_len = lambda m: min(max_spec, int(alpha * m + offset + 1e-6))
    depth = spec_len(int(lengths.max()))
    if depth < 1:
        return None
    ahead = positions[:, None] + np.arange(1, depth + 1)[None, :]
    follow = np.where(ahead < len(flat), flat[np.minimum(ahead, len(flat) - 1)], SEP).astype(np.int64)
    follow[np.cumsum(follow == SEP, axis=1) > 0] = SEP  # nothing after the end of a sequence
    best = None
    # Longest matches first; a match of m proposes at most spec_len(m) tokens, so its summed
    # probabilities cannot exceed that: shorter matches are not tried once it is reached.
    for m in np.unique(lengths)[::-1].tolist():
        k = spec_len(m)
        if k < 1 or (best is not None and k <= best.score):
            break
        found = _most_frequent(follow[lengths >= m, :k], k, min_prob)
        if found is not None and (best is None or found[3] > best.score):
            best = Speculation(*found[:3], found[4], m, found[3], source)
    return best


def _most_frequent(follow: np.ndarray, k: int, min_prob: float):
    """(tokens, parents, probs, score, rows) of the ``k`` most frequent prefixes of the rows of
    ``follow`` (SEP-padded continuations, one per occurrence) with a share >= ``min_prob``, as a tree
    (a prefix is its last token, under the prefix one shorter), or None."""
    n, width = follow.shape
    rows = follow[np.lexsort(follow.T[::-1])]  # sorted: the rows sharing a prefix are adjacent
    starts = np.ones((n, width), bool)  # a new prefix of length j + 1 begins at row r
    starts[1:] = np.logical_or.accumulate(rows[1:] != rows[:-1], axis=1)
    flat = np.flatnonzero(starts.T)  # level-major: j * n + r
    level, row = flat // n, flat % n
    after = np.append(flat[1:], width * n)
    count = np.where(after // n == level, after - flat, n - row)  # rows to the next prefix of that length
    token = rows[row, level]
    chosen = np.flatnonzero((token != SEP) & (count >= min_prob * n - 1e-9))
    if len(chosen) == 0:
        return None
    # Most frequent first, a parent (never rarer than its child) before its children.
    chosen = chosen[np.lexsort((level[chosen], -count[chosen]))][:k]
    parent = np.searchsorted(flat, (level - 1) * n + row, side="right") - 1  # the prefix one shorter
    where = {}
    parents = []
    for i, node in enumerate(chosen.tolist()):
        where[node] = i + 1
        parents.append(where[int(parent[node])] if level[node] > 0 else 0)
    probs = (count[chosen] / n).tolist()
    return token[chosen].tolist(), [-1, *parents], probs, float(sum(probs)), n


class SuffixDecoding:
    """The proposer: the better of the request's and the cache's speculations each step (see the
    module's doc). ``cache`` may be None (the request's own tokens only) and is shared, never cleared
    here: the caller adds each finished output (:meth:`SuffixCache.add`)."""

    feature_layers: Sequence[int] = ()

    def __init__(
        self,
        cache: SuffixCache | None = None,
        max_spec: int = 16,
        alpha: float = 1.0,
        offset: float = 0.0,
        min_prob: float = 0.1,
        max_pattern: int = 24,
        max_occurrences: int = 256,
    ):
        if max_spec < 1 or max_pattern < 1 or max_occurrences < 1:
            raise ValueError("SuffixDecoding: max_spec, max_pattern and max_occurrences must be >= 1")
        if not 0 <= min_prob <= 1:
            raise ValueError(f"SuffixDecoding: min_prob must be in [0, 1], got {min_prob}")
        self.cache = cache
        self.max_spec, self.alpha, self.offset, self.min_prob = max_spec, alpha, offset, min_prob
        self.max_pattern, self.max_occurrences = max_pattern, max_occurrences

    def reset(self, features: Tensor | None) -> None:
        pass

    def observe(self, features: Tensor | None) -> None:
        pass

    def speculate(self, context: Sequence[int]) -> Speculation | None:
        """The proposal for ``context``'s next tokens (None: no continuation is probable enough)."""
        ids = np.asarray(context, dtype=np.int32)
        pattern = ids[-self.max_pattern :]
        args = (pattern, self.max_spec, self.alpha, self.offset, self.min_prob)
        mine = np.flatnonzero(ids[:-1] == ids[-1])[-self.max_occurrences :]
        best = speculate(ids, mine, *args, source="request")
        if self.cache is not None and self.cache.outputs:
            index = self.cache.snapshot()
            found = speculate(
                index[0], occurrences_in_cache(index, int(ids[-1]), self.max_occurrences), *args, source="cache"
            )
            if found is not None and (best is None or found.score > best.score):
                best = found
        return best

    def propose(self, context: Sequence[int]) -> tuple[Tensor, Tensor]:
        return self.propose_scored(context).tensors()

    def propose_scored(self, context: Sequence[int]) -> ScoredTree:
        """The proposal, each node's confidence its share of the occurrences, tracked by (source, that
        share in fifths, occurrences counted 1 / 2-3 / 4+, depth 1 / 2 / 3-4 / 5+)."""
        s = self.speculate(context)
        if s is None:
            return ScoredTree([context[-1]], [-1], [1.0], [None])
        depth = [0]
        for p in s.parents[1:]:
            depth.append(depth[p] + 1)
        support = 0 if s.support == 1 else 1 if s.support < 4 else 2
        bucket = lambda d: d if d <= 2 else 3 if d <= 4 else 4
        keys = [(s.source, min(4, int(5 * p)), support, bucket(d)) for p, d in zip(s.probs, depth[1:])]
        return ScoredTree([context[-1], *s.tokens], s.parents, [1.0, *s.probs], [None, *keys])


class SuffixFamily(DraftFamily):
    """``eval --draft suffix``: suffix decoding alone, over the request and a cache of the run's outputs."""

    name = "suffix"
    title = "suffix decoding"
    trainable = False

    def proposer(self, draft, spec: TreeSpec) -> SuffixDecoding:
        return SuffixDecoding(SuffixCache(), max_spec=spec.max_nodes)

    def decode_modes(self, depth: int, topk: int, max_nodes: int, min_prob: float) -> dict[str, TreeSpec]:
        return {"suffix": TreeSpec(depth=max_nodes, topk=1, max_nodes=max_nodes)}
