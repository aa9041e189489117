"""Speculative decoding of a Hugging Face causal LM with a proposer: chains, trees and blocks.

Each step a :class:`Proposer` proposes a tree of candidate tokens rooted at the last committed
token (a chain and a block are trees too); the target scores the whole tree in one forward pass,
with ``tree_attention`` standing in for the model's attention (registered with transformers as the
``torchspec_tree`` implementation); verification keeps the longest path the target agrees with
(``verify_tree_greedy``, or ``verify_tree_sampling`` at a temperature > 0) and the KV cache is
compacted to that path.

Every draft family makes its proposer (``torchspec_ext.drafts``); :class:`TreeProposer` grows
EAGLE-2-style trees from any :class:`StepDraft` (``next_logprobs(context, paths)``), such as an
EAGLE-3 draft or the target itself (:class:`TargetAsDraft`: every step then accepts the whole depth
at temperature 0, which the tests use).

Several sequences decode together in a :class:`SpeculativeBatch` (one forward a step verifies every
sequence's tree, each in its own row of the KV cache); ``speculative_generate`` is a batch of one.

Several proposers verify together: ``speculative_generate`` given a list of them decodes with
:class:`torchspec_ext.drafts.combined.Combined`, which merges their trees into one (shared prefixes
merged) and keeps the nodes of highest calibrated confidence within a node budget. A proposer says how
sure it is of each node through ``propose_scored`` (a :class:`ScoredTree`).
"""

from __future__ import annotations

import copy
import heapq
import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor

from torchspec_ext.data import pad_rows
from torchspec_ext.ops import tree_attention, verify_tree_greedy, verify_tree_sampling
from torchspec_ext.small_rows import best_seconds
from torchspec_ext.target import stop_token_ids

TREE_ATTENTION = "torchspec_tree"


class Proposer(Protocol):
    """What :func:`speculative_generate` decodes with. ``feature_layers``: the target's hidden states
    it reads (Hugging Face ``hidden_states`` indices; empty for none). ``reset`` starts a sequence
    with the features ``[n, len(feature_layers) * H]`` of every prompt token but the last (None
    when it reads none); ``observe`` gives those of the tokens committed since (the last committed
    token, the next root, is never included); ``propose`` returns ``(tokens [T], parents [T])`` of a
    tree whose node 0 is ``context[-1]`` and whose parents come before their children."""

    feature_layers: Sequence[int]

    def reset(self, features: Tensor | None) -> None: ...

    def observe(self, features: Tensor | None) -> None: ...

    def propose(self, context: Sequence[int]) -> tuple[Tensor, Tensor]: ...


@dataclass
class ScoredTree:
    """A proposal with the proposer's confidence in each node: ``tokens`` and ``parents`` as
    :meth:`Proposer.propose` returns them (node 0 the root, parents first), ``prior[j]`` the
    proposer's own estimate in [0, 1] that the target follows the path to node ``j`` (a draft's
    cumulative probability; a lookup's estimate from its match), never above its parent's, and
    ``keys[j]`` what its calibration is tracked by (hashable; None for the root). The root's prior is 1."""

    tokens: list[int]
    parents: list[int]
    prior: list[float]
    keys: list

    @staticmethod
    def chain(root: int, tokens: Sequence[int], prior: Sequence[float], keys: Sequence) -> ScoredTree:
        return ScoredTree([root, *tokens], list(range(-1, len(tokens))), [1.0, *prior], [None, *keys])

    def tensors(self) -> tuple[Tensor, Tensor]:
        return torch.tensor(self.tokens, dtype=torch.long), torch.tensor(self.parents, dtype=torch.long)


class StepDraft(Protocol):
    """A draft that scores one tree level at a time (EAGLE): log-probabilities ``[len(paths), V]`` of
    the token after ``context + path``, per path. One that reads the target's hidden states also has
    ``feature_layers``, ``reset`` and ``observe`` as :class:`Proposer` has."""

    def next_logprobs(self, context: Sequence[int], paths: Sequence[Sequence[int]]) -> Tensor: ...


@dataclass
class TreeSpec:
    """Shape of the proposed trees (EAGLE-2 style): at each of ``depth`` levels, the ``topk``
    nodes of the previous level each offer their ``topk`` best next tokens, and the ``topk``
    candidates of highest cumulative draft log-probability become the new level; at most
    ``max_nodes`` draft nodes in all. ``topk=1`` is a chain. A candidate whose cumulative draft
    probability is below ``min_prob`` is not proposed: the tree stops growing where the draft
    does not expect the target to follow (each node costs a draft step and a verified token)."""

    depth: int = 4
    topk: int = 4
    max_nodes: int = 16
    min_prob: float = 0.0

    @staticmethod
    def chain(depth: int, min_prob: float = 0.0) -> TreeSpec:
        return TreeSpec(depth=depth, topk=1, max_nodes=depth, min_prob=min_prob)


def decode_modes(depth: int, topk: int, max_nodes: int, min_prob: float = 0.0) -> dict[str, TreeSpec]:
    """The proposal shapes an evaluation measures: a chain of ``depth``, a tree (when ``topk`` > 1),
    and with ``min_prob`` > 0 each again pruned below that cumulative draft probability (what pays
    where every verified token costs)."""
    modes = {"chain": TreeSpec.chain(depth)}
    if topk > 1:
        modes["tree"] = TreeSpec(depth, topk, max_nodes)
    return with_pruned(modes, min_prob)


def with_pruned(modes: dict[str, TreeSpec], min_prob: float) -> dict[str, TreeSpec]:
    """``modes`` and, with ``min_prob`` > 0, each again pruned below that cumulative draft probability."""
    if min_prob <= 0:
        return modes
    return modes | {f"{name}, p >= {min_prob:g}": replace(spec, min_prob=min_prob) for name, spec in modes.items()}


class TreeProposer:
    """EAGLE-2-style trees of ``spec``'s shape grown from a :class:`StepDraft`, one level a call."""

    def __init__(self, draft: StepDraft, spec: TreeSpec):
        self.draft, self.spec = draft, spec
        self.feature_layers = list(getattr(draft, "feature_layers", ()))

    def reset(self, features: Tensor | None) -> None:
        if self.feature_layers:
            self.draft.reset(features)

    def observe(self, features: Tensor | None) -> None:
        if self.feature_layers:
            self.draft.observe(features)

    def propose(self, context: Sequence[int]) -> tuple[Tensor, Tensor]:
        return propose_tree(self.draft, context, self.spec)

    def propose_scored(self, context: Sequence[int]) -> ScoredTree:
        """The tree with each node's cumulative draft probability, calibrated by its log2 bin and depth."""
        tokens, parents, scores = _grow_tree(self.draft, context, self.spec)
        depths = [0] * len(tokens)
        for j in range(1, len(tokens)):
            depths[j] = depths[parents[j]] + 1
        prior = [min(1.0, math.exp(s)) for s in scores]
        keys = [None] + [(min(12, int(-2 * s / math.log(2))), min(d, 4)) for s, d in zip(scores[1:], depths[1:])]
        return ScoredTree(tokens, parents, prior, keys)


def propose_tree(draft: StepDraft, context: Sequence[int], spec: TreeSpec) -> tuple[Tensor, Tensor]:
    """(tokens [T], parents [T]) of a draft tree; node 0 is ``context[-1]`` (the root)."""
    tokens, parents, _ = _grow_tree(draft, context, spec)
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)


def _grow_tree(draft: StepDraft, context: Sequence[int], spec: TreeSpec) -> tuple[list[int], list[int], list[float]]:
    """(tokens, parents, cumulative draft log-probabilities) of an EAGLE-2 tree; node 0 the root (0.0)."""
    tokens, parents, scores, paths = [context[-1]], [-1], [0.0], [[]]
    floor = math.log(spec.min_prob) if spec.min_prob > 0 else -math.inf
    frontier = [0]
    for _ in range(spec.depth):
        budget = spec.max_nodes - (len(tokens) - 1)
        if budget <= 0 or not frontier:
            break
        logprobs = draft.next_logprobs(context, [paths[n] for n in frontier]).float()
        candidates = []  # (score, parent node, token) of every child of the frontier
        top = logprobs.topk(min(spec.topk, logprobs.shape[-1]), dim=-1)
        for row, node in enumerate(frontier):
            for value, token in zip(top.values[row].tolist(), top.indices[row].tolist()):
                candidates.append((scores[node] + value, node, token))
        candidates = [c for c in candidates if c[0] >= floor]
        chosen = heapq.nlargest(min(spec.topk, budget), candidates, key=lambda c: c[0])
        chosen.sort(key=lambda c: (c[1], -c[0]))  # children after their parent, best first
        new_nodes = []
        for score, node, token in chosen:
            tokens.append(token)
            parents.append(node)
            scores.append(score)
            paths.append(paths[node] + [token])
            new_nodes.append(len(tokens) - 1)
        frontier = new_nodes
    return tokens, parents, scores


def _tree_depths(parents: Tensor) -> Tensor:
    depths = [0] * len(parents)
    for j, p in enumerate(parents.tolist()):
        if p >= 0:
            depths[j] = depths[p] + 1
    return torch.tensor(depths, dtype=torch.long)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """tree_attention when the call carries a tree, else transformers' own SDPA attention."""
    parents = kwargs.get("tree_parents")
    if parents is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    prefix_lens = kwargs["tree_prefix_lens"]
    _place_trees(key, value, prefix_lens, query.shape[2])
    out = tree_attention(query, key, value, prefix_lens, parents, scaling)
    return out.transpose(1, 2).contiguous(), None


def _place_trees(key: Tensor, value: Tensor, prefix_lens: Tensor, nodes: int) -> None:
    """The cache appended the tree after its longest row; a shorter row's tree moves to right after the
    row's own prefix, where tree_attention (and the commit after it) read it. In place: the cache's own
    tensors."""
    if key.shape[0] == 1:  # one row: its prefix is the cache's
        return
    end = key.shape[2] - nodes
    for row, length in enumerate(prefix_lens.tolist()):
        if length != end:
            key[row, :, length : length + nodes] = key[row, :, end:].clone()
            value[row, :, length : length + nodes] = value[row, :, end:].clone()


def enable_tree_attention(model) -> None:
    """Make ``model`` (a transformers causal LM) run tree_attention on calls given a tree, and its
    usual SDPA attention otherwise."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TREE_ATTENTION, _attention)
    AttentionMaskInterface.register(TREE_ATTENTION, sdpa_mask)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(TREE_ATTENTION)
    else:
        model.config._attn_implementation = TREE_ATTENTION


def _cache_keyword(model) -> str:
    # transformers renamed past_key_values to cache; take whichever this version's forward has.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _commit_path(cache, prefix_len: int, path_nodes: Tensor) -> None:
    """Keep the prefix and the verified path in a one-row DynamicCache (:func:`_commit_paths`)."""
    _commit_paths(cache, [prefix_len], [path_nodes])


def _commit_paths(cache, prefix_lens: list[int], paths: list[Tensor]) -> None:
    """Keep each row's prefix and verified path in a DynamicCache: in row b, tree node ``paths[b][i]``
    moves to position ``prefix_lens[b] + i`` and the rest of its tree is dropped (a shorter row keeps
    stale positions after its own length, which nothing reads). Costs the moved nodes, not the
    prefixes (the kept part is a view)."""
    keep = max(p + len(path) for p, path in zip(prefix_lens, paths))
    moves = []
    for row, (prefix_len, path) in enumerate(zip(prefix_lens, paths)):
        moved = path != torch.arange(len(path), device=path.device)
        if moved.any():
            moves.append((row, prefix_len + path[moved], prefix_len + moved.nonzero().squeeze(1)))
    for layer in cache.layers:
        for row, src, dst in moves:  # src > dst; the right side is gathered (copied) before the write
            layer.keys[row, :, dst] = layer.keys[row, :, src]
            layer.values[row, :, dst] = layer.values[row, :, src]
        layer.keys, layer.values = layer.keys[:, :, :keep], layer.values[:, :, :keep]


def _keep_rows(cache, rows: list[int], lengths: list[int]) -> None:
    """Only ``rows`` of a DynamicCache, cut to the longest of their ``lengths``."""
    keep = max(lengths, default=0)
    index = torch.tensor(rows, dtype=torch.long)
    for layer in cache.layers:
        layer.keys = layer.keys[index.to(layer.keys.device), :, :keep]
        layer.values = layer.values[index.to(layer.values.device), :, :keep]


def _stack_cache(cache, rows: int, other) -> None:
    """Appends the one row of ``other`` (a DynamicCache) below the ``rows`` of ``cache``, the shorter
    padded with zeros at the end (positions after a row's length are never read). Either may have no
    layers yet (one-token prompts: nothing prefilled)."""
    for i in range(max(len(cache.layers), len(other.layers))):
        like = (cache.layers if i < len(cache.layers) else other.layers)[i].keys
        if i == len(cache.layers):
            cache.layers.append(copy.copy(other.layers[i]))
            cache.layers[i].keys = cache.layers[i].values = _empty_rows(like, rows)
        mine = cache.layers[i]
        if i < len(other.layers):
            keys, values = other.layers[i].keys, other.layers[i].values
        else:
            keys = values = _empty_rows(like, 1)
        length = max(mine.keys.shape[2], keys.shape[2])
        mine.keys = torch.cat([_pad_positions(mine.keys, length), _pad_positions(keys, length)])
        mine.values = torch.cat([_pad_positions(mine.values, length), _pad_positions(values, length)])


def _empty_rows(like: Tensor, rows: int) -> Tensor:
    return like.new_zeros(rows, like.shape[1], 0, like.shape[3])


def _pad_positions(t: Tensor, length: int) -> Tensor:
    return torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[2]))


def _score_tree(target, tokens: Tensor, parents: Tensor, prefix_len, hidden_states: bool, cache: dict):
    """The target's forward over trees after their cached prefixes (tree attention): ``tokens`` and
    ``parents`` ``[T]`` after ``prefix_len`` tokens, or ``[B, T]`` after ``prefix_len[b]`` in row b."""
    if tokens.dim() == 1:
        tokens, parents, prefix_len = tokens[None], parents[None], [prefix_len]
    prefix = torch.tensor(prefix_len, device=tokens.device)
    positions = prefix[:, None] + torch.stack([_tree_depths(p).to(tokens.device) for p in parents])
    return target(
        tokens,
        position_ids=positions,
        use_cache=True,
        output_hidden_states=hidden_states,
        tree_parents=parents,
        tree_prefix_lens=prefix,
        **cache,
    )


@torch.no_grad()
def measure_node_cost(target, prompt: Sequence[int], nodes: int = 4, repeats: int = 3) -> float:
    """What verifying a node costs on this machine, as a share of a verification forward of the root
    alone: the target's forwards over a chain of ``nodes`` after ``prompt`` and over its root, each
    the best of ``repeats`` after a warm-up, ``(chain - root) / (nodes * root)``, at least 0. Near 0
    where a forward is bound by reading the weights whatever its rows (a GPU's); about 0.1 on a 2-core
    CPU, where each row costs compute. The target's dtype and device are those it decodes in."""
    from transformers import DynamicCache

    if len(prompt) < 1 or nodes < 1:
        raise ValueError(
            f"measure_node_cost: needs a prompt and nodes >= 1, got {len(prompt)} tokens and {nodes} nodes"
        )
    enable_tree_attention(target)
    device = next(target.parameters()).device
    cache_kw, cache = _cache_keyword(target), DynamicCache()
    prefix_len = len(prompt) - 1
    if prefix_len:
        target(torch.tensor([list(prompt[:-1])], device=device), use_cache=True, **{cache_kw: cache})
    chain = torch.tensor([prompt[-1], *(list(prompt) * nodes)[:nodes]], device=device)

    def forward(size: int) -> Callable[[], None]:
        def run():
            _score_tree(target, chain[:size], torch.arange(-1, size - 1, device=device), prefix_len, False,
                        {cache_kw: cache})  # fmt: skip
            _commit_path(cache, prefix_len, chain.new_zeros(0))  # the tree's rows out of the cache again
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return run

    root, whole = best_seconds(forward(1), repeats), best_seconds(forward(nodes + 1), repeats)
    return max(0.0, (whole - root) / (nodes * root))


@dataclass
class SpeculativeResult:
    tokens: list[int]  # the generated tokens (the prompt excluded)
    target_forwards: int = 0  # tree-scoring passes (the prompt's prefill not counted)
    accepted_per_step: list[int] = field(default_factory=list)
    proposed_per_step: list[int] = field(default_factory=list)  # draft nodes of each step's tree
    seconds: float = 0.0

    @property
    def acceptance_length(self) -> float:
        """Mean tokens emitted per target forward (accepted draft tokens + the target's own)."""
        return len(self.tokens) / max(1, self.target_forwards)


def _one_proposer(proposer: Proposer | Sequence[Proposer]) -> Proposer:
    """A list of proposers as one (their ``Combined``; a single one as itself)."""
    if hasattr(proposer, "propose"):
        return proposer
    proposers = list(proposer)
    if len(proposers) == 1:
        return proposers[0]
    from torchspec_ext.drafts.combined import Combined

    return Combined(proposers)


def _features(out, layers: list[int], row: int = 0) -> Tensor | None:
    """[T, len(layers) * H]: the hidden states ``layers`` of row ``row`` of a forward."""
    return torch.cat([out.hidden_states[i][row] for i in layers], -1) if layers else None


def _prefill(
    target, prompt: list[int], layers: list[int], cache: dict, device
) -> tuple[list[int], Tensor | None, Tensor]:
    """The target's forward over the prompt before its last token (the root, the last token, is scored
    with the first tree): (the tokens it predicted, their features, their logits), what on_step sees."""
    if len(prompt) > 1:
        out = target(torch.tensor([prompt[:-1]], device=device), use_cache=True,
                     output_hidden_states=bool(layers), **cache)  # fmt: skip
        return prompt[1:], _features(out, layers), out.logits[0]
    empty = torch.empty(0, len(layers) * target.config.hidden_size, device=device) if layers else None
    return [], empty, torch.empty(0, target.config.vocab_size, device=device)


@dataclass
class DecodingSequence:
    """One sequence of a :class:`SpeculativeBatch`: its proposer, what is committed (the prompt and
    the tokens emitted), its options, and its result so far. ``done``: it has ended and left the batch."""

    proposer: Proposer
    committed: list[int]
    max_new_tokens: int
    temperature: float
    stop_ids: set[int]
    generator: torch.Generator | None
    on_step: Callable[[list[int], Tensor | None, Tensor], bool | None] | None
    result: SpeculativeResult
    started: float
    done: bool = False

    def finish(self) -> None:
        self.done = True
        self.result.seconds = time.perf_counter() - self.started


class SpeculativeBatch:
    """Sequences decoded together: each :meth:`step` verifies every sequence's tree in one target forward
    (their KV caches are the rows of one, each row's committed positions first; tree_attention reads each
    row's own prefix and tree), then commits each row on its own. A sequence joins after its prompt's
    prefill (:meth:`add`) and leaves when it ends; what it generates is what it would generate alone
    (:func:`speculative_generate` is a batch of one). Rows of several nodes are padded to the widest
    tree; the padding is never verified."""

    def __init__(self, target):
        enable_tree_attention(target)
        self.target, self.device, self.cache_kw = target, next(target.parameters()).device, _cache_keyword(target)
        self.sequences: list[DecodingSequence] = []  # row b of the cache is sequences[b]
        self.cache = None

    @torch.no_grad()
    def add(
        self, proposer: Proposer | Sequence[Proposer], prompt: Sequence[int], max_new_tokens: int,
        temperature: float = 0.0, eos_token_id: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        on_step: Callable[[list[int], Tensor | None, Tensor], bool | None] | None = None,
    ) -> DecodingSequence:  # fmt: skip
        """Prefills ``prompt`` and adds its sequence to the batch (the arguments as
        :func:`speculative_generate`'s); a sequence with nothing to generate is done at once."""
        from transformers import DynamicCache

        proposer = _one_proposer(proposer)
        if len(prompt) < 1:
            raise ValueError("speculative_generate: the prompt must hold at least one token")
        if temperature < 0:
            raise ValueError(f"speculative_generate: temperature must be >= 0, got {temperature}")
        if eos_token_id is None:
            eos_token_id = stop_token_ids(self.target)
        stop_ids = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        started = time.perf_counter()
        cache = DynamicCache()
        seen = _prefill(self.target, list(prompt), list(proposer.feature_layers), {self.cache_kw: cache}, self.device)
        proposer.reset(seen[1])
        seq = DecodingSequence(proposer, list(prompt), max_new_tokens, temperature, stop_ids, generator, on_step,
                               SpeculativeResult(tokens=[]), started)  # fmt: skip
        if (on_step is not None and bool(on_step(*seen))) or max_new_tokens <= 0:
            seq.finish()
            return seq
        if self.cache is None:
            self.cache = cache
        else:
            _stack_cache(self.cache, len(self.sequences), cache)
        self.sequences.append(seq)
        return seq

    @torch.no_grad()
    def step(self) -> list[DecodingSequence]:
        """One verification of every sequence in the batch; returns those that ended (they leave it)."""
        if not self.sequences:
            return []
        trees = [seq.proposer.propose(seq.committed) for seq in self.sequences]
        width = max(len(tokens) for tokens, _ in trees)
        tokens = torch.zeros(len(trees), width, dtype=torch.long)
        parents = torch.zeros(len(trees), width, dtype=torch.long)  # padding: children of the root
        for row, (t, p) in enumerate(trees):
            tokens[row, : len(t)], parents[row, : len(p)] = t, p
        parents[:, 0] = -1
        tokens, parents = tokens.to(self.device), parents.to(self.device)
        prefix_lens = [len(seq.committed) - 1 for seq in self.sequences]
        layers = [list(seq.proposer.feature_layers) for seq in self.sequences]
        out = _score_tree(self.target, tokens, parents, prefix_lens, any(layers), {self.cache_kw: self.cache})
        paths = []
        for row, seq in enumerate(self.sequences):
            size = len(trees[row][0])
            args = (tokens[row : row + 1, :size], parents[row : row + 1, :size], out.logits[row : row + 1, :size])
            if seq.temperature == 0:
                num, path, nxt = verify_tree_greedy(*args)
            else:
                num, path, nxt = verify_tree_sampling(*args, seq.temperature, seq.generator)
            path_nodes = path[0, : int(num[0]) + 1]
            paths.append(path_nodes)
            self._commit(seq, row, tokens[row, :size], path_nodes, int(nxt[0]), out, layers[row])
        _commit_paths(self.cache, prefix_lens, paths)
        ended = [seq for seq in self.sequences if seq.done]
        if ended:
            rows = [row for row, seq in enumerate(self.sequences) if not seq.done]
            self.sequences = [self.sequences[row] for row in rows]
            _keep_rows(self.cache, rows, [prefix_lens[row] + len(paths[row]) for row in rows])
            if not self.sequences:
                self.cache = None
        return ended

    @staticmethod
    def _commit(seq: DecodingSequence, row: int, tree: Tensor, path_nodes: Tensor, bonus: int, out, layers) -> None:
        """Row ``row``'s verified path of its ``tree`` and the target's next token ``bonus``: emitted,
        observed by the proposer, shown to on_step. The root and the accepted nodes are committed now;
        the next token is the next root."""
        kept = _features(out, layers, row)[path_nodes] if layers else None
        seq.proposer.observe(kept)
        emitted = tree[path_nodes[1:]].tolist() + [bonus]
        result = seq.result
        result.target_forwards += 1
        result.accepted_per_step.append(len(path_nodes) - 1)
        result.proposed_per_step.append(len(tree) - 1)
        done = False
        for i, token in enumerate(emitted):
            result.tokens.append(token)
            seq.committed.append(token)
            if token in seq.stop_ids or len(result.tokens) == seq.max_new_tokens:
                emitted, done = emitted[: i + 1], True
                break
        if seq.on_step is not None:
            n = len(emitted)
            logits = out.logits[row, path_nodes[:n]]
            done = bool(seq.on_step(emitted, kept[:n] if layers else None, logits)) or done
        if done:
            seq.finish()


@torch.no_grad()
def speculative_generate(
    target,
    proposer: Proposer | Sequence[Proposer],
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[list[int], Tensor | None, Tensor], bool | None] | None = None,
) -> SpeculativeResult:
    """Generate up to ``max_new_tokens`` after ``prompt`` (token ids) by speculative decoding.

    At temperature 0 the output is the target's greedy decoding, token for token (up to the
    rounding differences of tree_attention against the model's own attention); above 0 it is
    distributed as the target's sampling at that temperature. Generation stops after an
    end-of-sequence token: ``eos_token_id``, else the target's generation config's.

    ``proposer`` may be a list of proposers: each step then verifies the union of their trees in one
    forward (``Combined(proposer)``, its default node budget; build a ``Combined`` to choose it).

    ``on_step(tokens, features, logits)``, if given, sees what the target computed: once after the
    prefill (``tokens``: the prompt after its first token; empty tensors for a one-token prompt), then
    after each verification (``tokens``: those emitted, cut at a stop). ``features [n, F]`` (the
    proposer's feature layers, None when it reads none) and ``logits [n, V]`` are the target's at the
    ``n = len(tokens)`` committed positions whose next token is ``tokens[i]``. A true return ends the
    generation after these tokens.

    Several sequences decode together in a :class:`SpeculativeBatch`.
    """
    batch = SpeculativeBatch(target)
    seq = batch.add(proposer, prompt, max_new_tokens, temperature, eos_token_id, generator, on_step)
    while not seq.done:
        batch.step()
    return seq.result


class TargetAsDraft:
    """The target model as its own draft (no cache: a full forward per call); for tests and as a
    ceiling on acceptance."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def next_logprobs(self, context: Sequence[int], paths: Sequence[Sequence[int]]) -> Tensor:
        rows = [list(context) + list(p) for p in paths]
        # Left padding with a mask keeps every row's last position at the end.
        ids = pad_rows(rows, 0, left=True)
        mask = pad_rows([[1] * len(r) for r in rows], 0, left=True)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(
            ids.to(self.device), attention_mask=mask.to(self.device), position_ids=positions.to(self.device)
        ).logits[:, -1]
        return torch.log_softmax(out.float(), dim=-1)
