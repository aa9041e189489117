"""Several proposers verified together: :class:`Combined` merges their trees into one each step and
keeps, within a node budget, the nodes the target is likeliest to follow.

Each member proposes a :class:`~torchspec_ext.speculate.ScoredTree`: its own confidence in each node
(the draft's cumulative probability; suffix decoding's share of the occurrences that continued so;
prompt lookup's guess from the n-gram it matched) and a calibration key. Those scores do not compare
as they are (a weak draft is over-confident, a lookup has no probability at all), so each is replaced
by the rate at which nodes of that member and key were actually followed by the target in this run
(:class:`Calibration`: counts with a prior at the member's own score, forgetting slowly). Outcomes
need no help from the decoder: a node proposed after position ``i`` was followed iff its path is
what was committed after ``i``, which the next contexts show, for the nodes verified and for those
left out of the tree alike (so a member whose nodes are never chosen is still calibrated).

The merged tree: the members' trees as one trie (a shared prefix once; a node's confidence the highest
any member gives it, never above its parent's), then nodes taken best first, a node only after its
parent, while each raises the expected tokens per unit of cost: ``(1 + sum of confidences) /
(1 + node_cost * nodes)``, the forward's cost growing by ``node_cost`` (relative to a forward of the
root alone) for each node verified; at most ``max_nodes``.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from torchspec_ext.drafts.lookup import PromptLookup
from torchspec_ext.drafts.suffix import SuffixCache, SuffixDecoding
from torchspec_ext.speculate import Proposer, ScoredTree, TreeSpec

# A node's marginal cost in the target's forward, relative to a forward of the root alone, where it is
# not measured (``speculate.measure_node_cost``, which eval, serve and train's held-out check use): on a
# 2-core CPU 0.08 in float32 and 0.11-0.14 in bfloat16; near 0 on a GPU.
NODE_COST = 0.1
# The cumulative draft probability below which the combination's draft tree stops growing (eval's and
# serve's --min-prob): the draft's levels cost time whether or not the target follows them.
MIN_PROB = 0.15


class Calibration:
    """P(the target follows a node) per (member, key), learned online: ``hits`` and ``trials`` with
    each observation's weight decaying by ``memory`` per later one in its cell, and a prior of weight
    ``weight`` at the member's own score. Shared by the requests of one server, or one evaluation run."""

    def __init__(self, weight: float = 4.0, memory: float = 0.998):
        self.weight, self.memory = weight, memory
        self.cells: dict[tuple, list[float]] = {}

    def estimate(self, member: str, key, prior: float) -> float:
        cell = self.cells.get((member, key))
        if cell is None:
            return prior
        return (cell[0] + self.weight * prior) / (cell[1] + self.weight)

    def update(self, member: str, key, followed: bool) -> None:
        cell = self.cells.setdefault((member, key), [0.0, 0.0])
        cell[0] = cell[0] * self.memory + followed
        cell[1] = cell[1] * self.memory + 1.0

    def clear(self) -> None:
        self.cells.clear()


class Reliability:
    """Predicted confidence against what happened, in ten bins of width 0.1."""

    def __init__(self):
        self.bins = [[0.0, 0, 0] for _ in range(10)]  # summed prediction, followed, nodes

    def add(self, predicted: float, followed: bool) -> None:
        b = self.bins[min(9, int(predicted * 10))]
        b[0] += predicted
        b[1] += followed
        b[2] += 1

    @property
    def nodes(self) -> int:
        return sum(b[2] for b in self.bins)

    def error(self) -> float | None:
        """Expected calibration error: the node-weighted mean of |mean prediction - rate followed| per bin."""
        n = self.nodes
        return sum(abs(b[0] - b[1]) for b in self.bins) / n if n else None

    def table(self) -> list[dict]:
        return [
            {"bin": f"{i / 10:.1f}-{(i + 1) / 10:.1f}", "nodes": n, "predicted": s / n, "followed": f / n}
            for i, (s, f, n) in enumerate(self.bins)
            if n
        ]


@dataclass
class CombinedStats:
    """What a :class:`Combined` did: per member, its proposing time, nodes proposed, nodes in the verified
    trees and those the target accepted (a node several members proposed counts for each); the merge's time
    (calibration, merge and choice); the reliability of each member's calibrated confidence (every node
    whose outcome became known), of its raw score, and of the verified trees' nodes."""

    members: list[str]
    steps: int = 0
    merge_seconds: float = 0.0
    verified_nodes: int = 0
    propose_seconds: list[float] = field(default_factory=list)
    proposed: list[int] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    calibrated: dict[str, Reliability] = field(default_factory=dict)
    raw: dict[str, Reliability] = field(default_factory=dict)
    tree: Reliability = field(default_factory=Reliability)

    def __post_init__(self):
        k = len(self.members)
        self.propose_seconds, self.proposed, self.verified, self.accepted = [0.0] * k, [0] * k, [0] * k, [0] * k
        self.calibrated = {m: Reliability() for m in self.members}
        self.raw = {m: Reliability() for m in self.members}

    def report(self) -> dict:
        steps = max(1, self.steps)
        return {
            "steps": self.steps,
            "merge_ms_per_step": 1000 * self.merge_seconds / steps,
            "verified_nodes_per_step": self.verified_nodes / steps,
            "members": {
                m: {
                    "propose_ms_per_step": 1000 * self.propose_seconds[i] / steps,
                    "proposed_per_step": self.proposed[i] / steps,
                    "verified_per_step": self.verified[i] / steps,
                    "accepted_per_step": self.accepted[i] / steps,
                    "calibration_error": self.calibrated[m].error(),
                    "raw_score_error": self.raw[m].error(),
                    "resolved_nodes": self.calibrated[m].nodes,
                    "reliability": self.calibrated[m].table(),
                }
                for i, m in enumerate(self.members)
            },
            "verified_calibration_error": self.tree.error(),
            "verified_reliability": self.tree.table(),
        }


@dataclass
class _Pending:
    """A member's proposal (or the verified tree, ``member`` None) whose nodes' outcomes are not all known."""

    member: int | None
    root: int  # the root's position in the context
    tokens: list[int]
    parents: list[int]
    depths: list[int]
    keys: list
    prior: list[float]
    confidence: list[float]
    sources: list[int]  # the verified tree's: members proposing each node, as bits
    done: list[bool]


def scored(proposer: Proposer, context: Sequence[int]) -> ScoredTree:
    """``proposer``'s ScoredTree; one without ``propose_scored`` is tracked by depth, its prior 0.5."""
    if hasattr(proposer, "propose_scored"):
        return proposer.propose_scored(context)
    tokens, parents = proposer.propose(context)
    tokens, parents = tokens.tolist(), parents.tolist()
    depths = [0] * len(tokens)
    for j in range(1, len(tokens)):
        depths[j] = depths[parents[j]] + 1
    return ScoredTree(tokens, parents, [0.5**d for d in depths], [None] + [min(d, 8) for d in depths[1:]])


class Combined:
    """A :class:`~torchspec_ext.speculate.Proposer` verifying ``proposers`` together (see the module's
    doc): ``max_nodes`` nodes at most per step besides the root, ``node_cost`` a node's cost relative to
    a one-token forward (0: every node up to the budget above ``min_confidence``). ``names`` name the
    members in ``stats``; ``calibration`` may be shared between Combined proposers (a server's requests)."""

    def __init__(
        self,
        proposers: Sequence[Proposer],
        max_nodes: int = 16,
        node_cost: float = NODE_COST,
        names: Sequence[str] | None = None,
        calibration: Calibration | None = None,
        min_confidence: float = 0.0,
    ):
        self.proposers = list(proposers)
        if not self.proposers:
            raise ValueError("Combined: give at least one proposer")
        if max_nodes < 0 or node_cost < 0 or not 0 <= min_confidence < 1:
            raise ValueError(
                f"Combined: max_nodes ({max_nodes}) and node_cost ({node_cost}) must be >= 0 and min_confidence "
                f"({min_confidence}) in [0, 1)"
            )
        names = list(names) if names is not None else [type(p).__name__ for p in self.proposers]
        if len(names) != len(self.proposers) or len(set(names)) != len(names):
            raise ValueError(f"Combined: {len(self.proposers)} proposers need as many distinct names, got {names}")
        self.names, self.max_nodes, self.node_cost, self.min_confidence = names, max_nodes, node_cost, min_confidence
        self.calibration = calibration if calibration is not None else Calibration()
        # The members' layers side by side, each layer once across members (a member's own list kept as
        # it is, repeats included: the first member's features are then exactly what it reads alone).
        self.feature_layers = []
        for p in self.proposers:
            self.feature_layers += [i for i in p.feature_layers if i not in self.feature_layers]
        self.stats = CombinedStats(self.names)
        self._pending: list[_Pending] = []

    def clear_statistics(self) -> None:
        """Forget the calibration and the statistics (after a warm-up)."""
        self.calibration.clear()
        self.stats = CombinedStats(self.names)
        self._pending = []

    def _columns(self, proposer, features: Tensor) -> Tensor:
        """``features``' columns of ``proposer``'s layers (the members' layers side by side, in order)."""
        if list(proposer.feature_layers) == self.feature_layers:
            return features
        width = features.shape[-1] // len(self.feature_layers)
        blocks = [self.feature_layers.index(i) for i in proposer.feature_layers]
        return torch.cat([features[:, b * width : (b + 1) * width] for b in blocks], -1)

    def reset(self, features: Tensor | None) -> None:
        self._pending = []  # a new sequence: what the last one left unknown stays so
        for p in self.proposers:
            p.reset(self._columns(p, features) if p.feature_layers else None)

    def observe(self, features: Tensor | None) -> None:
        for p in self.proposers:
            p.observe(self._columns(p, features) if p.feature_layers else None)

    def propose(self, context: Sequence[int]) -> tuple[Tensor, Tensor]:
        trees = []
        for i, p in enumerate(self.proposers):
            begin = time.perf_counter()
            trees.append(scored(p, context))
            self.stats.propose_seconds[i] += time.perf_counter() - begin
        begin = time.perf_counter()
        self._resolve(context)
        tokens, parents = self._merge(trees, len(context) - 1)
        self.stats.merge_seconds += time.perf_counter() - begin
        self.stats.steps += 1
        return torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)

    def _merge(self, trees: list[ScoredTree], root: int) -> tuple[list[int], list[int]]:
        tokens, parents, confidence, sources, children = [trees[0].tokens[0]], [-1], [1.0], [0], [[]]
        merged: dict[tuple[int, int], int] = {}
        members = []
        for i, tree in enumerate(trees):
            name, n = self.names[i], len(tree.tokens)
            conf, where, depths = [1.0] * n, [0] * n, [0] * n
            for j in range(1, n):
                p, token = tree.parents[j], tree.tokens[j]
                depths[j] = depths[p] + 1
                conf[j] = min(self.calibration.estimate(name, tree.keys[j], tree.prior[j]), conf[p])
                k = merged.get((where[p], token))
                if k is None:
                    k = merged[(where[p], token)] = len(tokens)
                    tokens.append(token)
                    parents.append(where[p])
                    confidence.append(conf[j])
                    sources.append(0)
                    children.append([])
                    children[where[p]].append(k)
                elif conf[j] > confidence[k]:
                    confidence[k] = conf[j]
                sources[k] |= 1 << i
                where[j] = k
            self.stats.proposed[i] += n - 1
            members.append((tree, conf, depths))
        # Best first; a node is worth verifying while it raises (1 + expected) / (1 + cost * nodes).
        heap = [(-confidence[k], k) for k in children[0]]
        heapq.heapify(heap)
        chosen, expected, cost = [0], 1.0, self.node_cost
        while heap and len(chosen) <= self.max_nodes:
            c, k = heapq.heappop(heap)
            c = -c
            if c <= self.min_confidence or c * (1 + cost * (len(chosen) - 1)) <= cost * expected:
                break
            chosen.append(k)
            expected += c
            for child in children[k]:
                heapq.heappush(heap, (-confidence[child], child))
        index = {k: i for i, k in enumerate(chosen)}
        out_tokens = [tokens[k] for k in chosen]
        out_parents = [-1] + [index[parents[k]] for k in chosen[1:]]
        self.stats.verified_nodes += len(chosen) - 1
        for k in chosen[1:]:
            for i in range(len(trees)):
                self.stats.verified[i] += (sources[k] >> i) & 1
        for i, (tree, conf, depths) in enumerate(members):
            if len(tree.tokens) > 1:
                self._pending.append(
                    _Pending(i, root, tree.tokens, tree.parents, depths, tree.keys, tree.prior, conf, [],
                             [False] * len(tree.tokens))
                )  # fmt: skip
        if len(out_tokens) > 1:
            depths = [0] * len(out_tokens)
            for j in range(1, len(out_tokens)):
                depths[j] = depths[out_parents[j]] + 1
            self._pending.append(
                _Pending(None, root, out_tokens, out_parents, depths, [], [], [confidence[k] for k in chosen],
                         [sources[k] for k in chosen], [False] * len(out_tokens))
            )  # fmt: skip
        return out_tokens, out_parents

    def _resolve(self, context: Sequence[int]) -> None:
        """Outcomes of earlier proposals that the committed tokens now decide: a node was followed iff
        its path is what was committed after its root."""
        still = []
        for rec in self._pending:
            after = context[rec.root + 1 : rec.root + 1 + max(rec.depths)]
            state = [1] * len(rec.tokens)  # 1 followed, 0 not, 2 not known yet
            for j in range(1, len(rec.tokens)):
                p = rec.parents[j]
                if state[p] != 1:
                    state[j] = state[p]
                elif rec.depths[j] > len(after):
                    state[j] = 2
                else:
                    state[j] = int(rec.tokens[j] == after[rec.depths[j] - 1])
                if state[j] == 2 or rec.done[j]:
                    continue
                rec.done[j] = True
                followed = state[j] == 1
                if rec.member is None:
                    self.stats.tree.add(rec.confidence[j], followed)
                    if followed:
                        for i in range(len(self.proposers)):
                            self.stats.accepted[i] += (rec.sources[j] >> i) & 1
                else:
                    name = self.names[rec.member]
                    self.calibration.update(name, rec.keys[j], followed)
                    self.stats.calibrated[name].add(rec.confidence[j], followed)
                    self.stats.raw[name].add(rec.prior[j], followed)
            if 2 in state:
                still.append(rec)
        self._pending = still


@dataclass
class LookupSpec:
    """Prompt lookup alone: a chain of up to ``max_tokens`` (``drafts.lookup``)."""

    max_tokens: int = 10

    @property
    def depth(self) -> int:
        return self.max_tokens

    @property
    def max_nodes(self) -> int:
        return self.max_tokens


@dataclass
class SuffixSpec:
    """Suffix decoding alone (``drafts.suffix``), over the request and a cache of ``cache_tokens``."""

    max_spec: int = 16
    alpha: float = 1.0
    min_prob: float = 0.1
    cache_tokens: int = 1 << 18

    @property
    def depth(self) -> int:
        return self.max_spec

    @property
    def max_nodes(self) -> int:
        return self.max_spec


@dataclass
class CombinationSpec:
    """The draft's ``tree`` (None: no trained draft), prompt lookup and suffix decoding, merged into at
    most ``max_nodes`` nodes a step (:class:`Combined`)."""

    tree: TreeSpec | None
    lookup: LookupSpec = field(default_factory=LookupSpec)
    suffix: SuffixSpec = field(default_factory=SuffixSpec)
    max_nodes: int = 16
    node_cost: float = NODE_COST

    @property
    def depth(self) -> int:
        return min(self.max_nodes, max(self.tree.depth if self.tree else 0, self.lookup.depth, self.suffix.depth))


ModeSpec = TreeSpec | LookupSpec | SuffixSpec | CombinationSpec


def build_proposer(family, draft, spec: ModeSpec) -> Proposer:
    """The proposer of one decoding mode: ``family``'s own for a TreeSpec, else the spec's (a suffix
    cache of its own in each, empty: :func:`output_caches` finds it)."""
    if isinstance(spec, LookupSpec):
        return PromptLookup(spec.max_tokens)
    if isinstance(spec, SuffixSpec):
        return SuffixDecoding(SuffixCache(spec.cache_tokens), spec.max_spec, spec.alpha, min_prob=spec.min_prob)
    if isinstance(spec, CombinationSpec):
        members, names = [], []
        if spec.tree is not None:
            members.append(family.proposer(draft, spec.tree))
            names.append(family.name)
        members += [build_proposer(family, draft, spec.lookup), build_proposer(family, draft, spec.suffix)]
        return Combined(members, spec.max_nodes, spec.node_cost, names=[*names, "lookup", "suffix"])
    return family.proposer(draft, spec)


def fit_modes(family, draft, modes: dict[str, ModeSpec]) -> dict[str, ModeSpec]:
    """``modes`` with the draft's own trees (its modes' and each combination's) in the shape ``draft``
    gives them (``DraftFamily.fit_modes``: a block draft caps them); the others as they are."""
    trees = {name: spec for name, spec in modes.items() if isinstance(spec, TreeSpec)}
    fitted = family.fit_modes(draft, trees) if trees else {}
    out = {}
    for name, spec in modes.items():
        if isinstance(spec, CombinationSpec) and spec.tree is not None:
            spec = replace(spec, tree=family.fit_modes(draft, {name: spec.tree})[name])
        out[name] = fitted.get(name, spec)
    return out


def output_caches(proposer) -> list[SuffixCache]:
    """The suffix caches ``proposer`` reads (its members' too): what each finished output is added to."""
    found = [proposer.cache] if isinstance(getattr(proposer, "cache", None), SuffixCache) else []
    for member in getattr(proposer, "proposers", ()):
        found += [c for c in output_caches(member) if all(c is not f for f in found)]
    return found


def evaluation_modes(
    family, depth: int, topk: int, max_nodes: int, min_prob: float, lookup_tokens: int = 10,
    node_cost: float = NODE_COST,
) -> dict[str, ModeSpec]:  # fmt: skip
    """What ``eval`` measures for ``family``: its own modes, then each training-free proposer alone
    (prompt lookup, suffix decoding) where the family is not that one, then the combination of the
    family's tree (when it has one; pruned below ``min_prob``, so the draft stops proposing where it
    does not expect to be followed) with both."""
    modes: dict[str, ModeSpec] = dict(family.decode_modes(depth, topk, max_nodes, min_prob))
    if family.name != "lookup":
        modes["lookup"] = LookupSpec(lookup_tokens)
    if family.name != "suffix":
        modes["suffix"] = SuffixSpec(max_spec=max_nodes)
    tree = None if family.name in ("lookup", "suffix") else TreeSpec(depth, topk, max_nodes, min_prob)
    modes["combined"] = combination_spec(tree, max_nodes, lookup_tokens, node_cost)
    return modes


def combination_spec(tree: TreeSpec | None, max_nodes: int, lookup_tokens: int = 10, node_cost: float = NODE_COST):
    return CombinationSpec(tree, LookupSpec(lookup_tokens), SuffixSpec(max_spec=max_nodes), max_nodes, node_cost)
