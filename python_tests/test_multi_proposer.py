"""Several proposers in one verification: suffix decoding against a plain-Python reference, its bounded
cache, the scored proposals, Combined's merge, budget and online calibration, and decoding with the
combination on the tiny targets (equal to greedy decoding), in eval and in train's held-out check."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from torchspec_ext.drafts.combined import (
    Calibration,
    CombinationSpec,
    Combined,
    LookupSpec,
    SuffixSpec,
    build_proposer,
    evaluation_modes,
    output_caches,
    scored,
)
from torchspec_ext.drafts.lookup import PromptLookup
from torchspec_ext.drafts.suffix import SEP, SuffixCache, SuffixDecoding, occurrences_in_cache, speculate
from torchspec_ext.speculate import ScoredTree, TargetAsDraft, TreeProposer, TreeSpec, speculative_generate


def reference_speculate(flat, positions, pattern, max_spec, alpha, offset, min_prob):
    """SuffixDecoding's choice, by enumeration: for every match length m, the occurrences whose last m
    tokens equal the pattern's vote for their continuations (up to alpha * m + offset tokens); the k most
    voted prefixes at or above min_prob (ties: shorter, then lexicographic); the m of highest summed share
    (ties: the longer m). (tokens, parents, probs, match) or None."""
    best = None
    for m in range(1, len(pattern) + 1):
        voters = [p for p in positions if all(p - i >= 0 and flat[p - i] == pattern[-1 - i] for i in range(m))]
        if not voters:
            break
        k = min(max_spec, int(alpha * m + offset + 1e-6))
        if k < 1:
            continue
        counts = Counter()
        for p in voters:
            prefix = ()
            for j in range(1, k + 1):
                if p + j >= len(flat) or flat[p + j] == SEP:
                    break
                prefix += (int(flat[p + j]),)
                counts[prefix] += 1
        kept = [(c, len(x), x) for x, c in counts.items() if c / len(voters) >= min_prob]
        kept.sort(key=lambda t: (-t[0], t[1], t[2]))
        kept = kept[:k]
        if not kept:
            continue
        score = sum(c for c, _, _ in kept) / len(voters)
        if best is None or score >= best[0]:
            index = {x: i + 1 for i, (_, _, x) in enumerate(kept)}
            parents = [-1] + [index.get(x[:-1], 0) for _, _, x in kept]
            best = (score, [x[-1] for _, _, x in kept], parents, [c / len(voters) for c, _, _ in kept], m)
    return None if best is None else best[1:]


def random_text(rng, length, phrases):
    out = []
    while len(out) < length:
        out += rng.choice(phrases) if rng.random() < 0.7 else [rng.randrange(30) for _ in range(rng.randrange(1, 4))]
    return out[:length]


@pytest.mark.parametrize("alpha, offset, min_prob", [(1.0, 0.0, 0.1), (2.0, 1.0, 0.0), (0.5, 0.0, 0.3)])
def test_suffix_speculation_equals_the_reference(alpha, offset, min_prob):
    rng = random.Random(7)
    phrases = [[rng.randrange(30) for _ in range(rng.randrange(2, 9))] for _ in range(6)]
    cache = SuffixCache()
    for _ in range(9):
        cache.add(random_text(rng, rng.randrange(5, 60), phrases))
    flat = cache.snapshot()[0]
    compared = 0
    for _ in range(60):
        pattern = np.asarray(random_text(rng, rng.randrange(1, 10), phrases), np.int32)
        positions = np.flatnonzero(flat == pattern[-1])
        assert positions.tolist() == occurrences_in_cache(cache.snapshot(), int(pattern[-1]), 10**6).tolist()
        got = speculate(flat, positions, pattern, 7, alpha, offset, min_prob)
        want = reference_speculate(flat.tolist(), positions.tolist(), pattern.tolist(), 7, alpha, offset, min_prob)
        if want is None:
            assert got is None
            continue
        tokens, parents, probs, match = want
        assert (got.tokens, got.parents, got.match) == (tokens, parents, match)
        assert got.probs == pytest.approx(probs) and got.score == pytest.approx(sum(probs))
        compared += len(tokens) > 1
    assert compared > 10  # the cases include trees with several nodes


def test_suffix_speculation_by_hand():
    cache = SuffixCache()
    for output in ([1, 2, 3, 4, 5], [1, 2, 3, 9, 9], [7, 2, 3, 4, 6]):
        cache.add(output)
    s = SuffixDecoding(cache)
    # The pattern 1 2 3 matches two outputs fully (3 tokens may be proposed: 4 5 and 9 9 share 1/2 each);
    # 2 3 matches all three (2 tokens: 4 at 2/3, then 9 at 1/3): 1.5 > 1.0.
    got = s.speculate([0, 1, 2, 3])
    assert (got.tokens, got.parents, got.match, got.support, got.source) == ([4, 9, 5], [-1, 0, 0, 1], 3, 2, "cache")
    got = s.speculate([0, 8, 2, 3])
    assert (got.tokens, got.probs, got.match) == ([4, 9], [2 / 3, 1 / 3], 2)
    # The request's own tokens: 5 6 7 8 repeats; a 6-token match may propose 6 tokens, all it has is 4.
    got = s.speculate([5, 6, 7, 8, 5, 6, 7, 8, 5, 6])
    assert (got.tokens, got.source, got.match, got.probs) == ([7, 8, 5, 6], "request", 6, [1.0] * 4)
    assert s.speculate([42]) is None
    assert SuffixDecoding(cache, min_prob=0.6).speculate([0, 8, 2, 3]).tokens == [4]
    tree = s.propose_scored([0, 1, 2, 3])
    assert tree.tokens == [3, 4, 9, 5] and tree.prior == [1.0, 0.5, 0.5, 0.5]
    assert tree.keys[1] == ("cache", 2, 1, 1) and tree.keys[3] == ("cache", 2, 1, 2)


def test_suffix_cache_is_bounded_and_evicts_the_oldest_outputs():
    cache = SuffixCache(max_tokens=10)
    cache.add([1, 2, 3, 4])
    cache.add([5, 6, 7])
    assert (cache.tokens, cache.outputs) == (7, 2)
    cache.add([8, 9, 10, 11])  # 11 tokens: the oldest output goes
    assert (cache.tokens, cache.outputs) == (7, 2)
    assert cache.snapshot()[0].tolist() == [5, 6, 7, SEP, 8, 9, 10, 11, SEP]
    assert cache.nbytes == 12 * 9  # ids, sorted ids and positions: int32 each
    cache.add(list(range(100, 130)))  # longer than the cache: its last 10 tokens
    assert cache.snapshot()[0].tolist() == [*range(120, 130), SEP] and cache.outputs == 1
    assert SuffixDecoding(cache).speculate([7, 120, 121]).tokens == [122, 123]  # a 2-token match: 2 tokens
    cache.clear()
    assert cache.tokens == 0 and SuffixDecoding(cache).speculate([120, 121]) is None
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        SuffixCache(0)


def test_scored_proposals_of_the_tree_and_lookup():
    class Fixed:
        def next_logprobs(self, context, paths):
            return torch.log_softmax(torch.arange(6, dtype=torch.float32).repeat(len(paths), 1), -1)

    proposer = TreeProposer(Fixed(), TreeSpec(depth=3, topk=2, max_nodes=5))
    tree = proposer.propose_scored([1, 2])
    tokens, parents = proposer.propose([1, 2])
    assert tree.tensors()[0].tolist() == tokens.tolist() and tree.parents == parents.tolist()
    p = torch.softmax(torch.arange(6, dtype=torch.float32), -1)
    assert tree.prior[1] == pytest.approx(float(p[5])) and tree.prior[3] == pytest.approx(float(p[5] ** 2))
    assert all(tree.prior[j] <= tree.prior[tree.parents[j]] for j in range(1, len(tree.tokens)))
    lookup = PromptLookup(3).propose_scored([1, 2, 3, 4, 1, 2, 3])  # a 3-gram match: 4 1 2
    assert lookup.tokens == [3, 4, 1, 2] and lookup.parents == [-1, 0, 1, 2]
    assert lookup.keys == [None, (3, 1), (3, 2), (3, 3)] and lookup.prior[1] > lookup.prior[2] > lookup.prior[3]
    assert PromptLookup(3).propose_scored([1, 2, 3]).tokens == [3]


class Fixed:
    """A proposer that proposes a given ScoredTree (its root replaced by the context's last token)."""

    feature_layers = ()

    def __init__(self, tokens, parents, prior, layers=()):
        self.tree = (tokens, parents, prior)
        self.feature_layers = list(layers)
        self.seen = []

    def reset(self, features):
        self.seen.append(("reset", features))

    def observe(self, features):
        self.seen.append(("observe", features))

    def propose_scored(self, context):
        tokens, parents, prior = self.tree
        return ScoredTree([context[-1], *tokens], [-1, *parents], [1.0, *prior], [None, *range(len(tokens))])


def test_the_merge_shares_prefixes_and_spends_the_budget_by_confidence():
    a = Fixed([1, 2, 3], [0, 1, 2], [0.9, 0.8, 0.1])
    b = Fixed([1, 5], [0, 1], [0.5, 0.4])
    # node_cost 0.1: 1 (0.9), 2 (0.8) and 5 (0.4) each raise (1 + expected) / (1 + 0.1 nodes); 3 (0.1) does not.
    tokens, parents = Combined([a, b], max_nodes=8, node_cost=0.1, names=["a", "b"]).propose([7])
    assert tokens.tolist() == [7, 1, 2, 5] and parents.tolist() == [-1, 0, 1, 1]
    tokens, parents = Combined([a, b], max_nodes=2, node_cost=0.1, names=["a", "b"]).propose([7])
    assert tokens.tolist() == [7, 1, 2] and parents.tolist() == [-1, 0, 1]
    tokens, _ = Combined([a, b], max_nodes=8, node_cost=0.0, names=["a", "b"]).propose([7])
    assert tokens.tolist() == [7, 1, 2, 5, 3]
    # A child is never more confident than its parent: 0.95 under a 0.5 counts as 0.5.
    combined = Combined([Fixed([4, 6], [0, 1], [0.5, 0.95])], max_nodes=1, node_cost=0.0)
    assert combined.propose([7])[0].tolist() == [7, 4]
    assert combined._pending[0].confidence == [1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="at least one proposer"):
        Combined([])
    with pytest.raises(ValueError, match="distinct names"):
        Combined([a, b], names=["x", "x"])


def test_one_proposer_alone_proposes_its_own_tree():
    class Fixed10:
        def next_logprobs(self, context, paths):
            return torch.log_softmax(torch.arange(10, dtype=torch.float32).repeat(len(paths), 1), -1)

    proposer = TreeProposer(Fixed10(), TreeSpec(depth=3, topk=3, max_nodes=9))
    want = proposer.propose([4, 5])
    got = Combined([proposer], max_nodes=9, node_cost=0.0).propose([4, 5])
    # The same nodes (best first, so perhaps in another order with the parents remapped).
    paths = lambda t, p: {tuple(t[k] for k in _path(p.tolist(), j)) for j in range(len(t))}
    assert paths(want[0].tolist(), want[1]) == paths(got[0].tolist(), got[1])


def _path(parents, j):
    out = []
    while j >= 0:
        out.append(j)
        j = parents[j]
    return out[::-1]


def test_calibration_learns_each_members_rate_from_later_contexts():
    """The context grows by what 'right' proposes; 'wrong' is never followed. Only one node is verified a
    step, yet both members' nodes are resolved, and their estimates move from the priors to the rates."""
    truth = list(range(100, 400))

    class Right(Fixed):
        def propose_scored(self, context):
            n = len(context)
            return ScoredTree([context[-1], *truth[n : n + 3]], [-1, 0, 1, 2], [1.0, 0.3, 0.3, 0.3], [None, 1, 2, 3])

    class Wrong(Fixed):
        def propose_scored(self, context):
            return ScoredTree([context[-1], 7, 8], [-1, 0, 1], [1.0, 0.9, 0.9], [None, 1, 2])

    combined = Combined([Right([], [], []), Wrong([], [], [])], max_nodes=1, node_cost=0.0, names=["right", "wrong"])
    context = truth[:1]
    for _ in range(60):
        tokens, _ = combined.propose(context)
        context = truth[: len(context) + 2]  # as if two tokens were committed
    cal = combined.calibration
    assert cal.estimate("right", 1, 0.3) > 0.9 and cal.estimate("right", 3, 0.3) > 0.9
    assert cal.estimate("wrong", 1, 0.9) < 0.1 and cal.estimate("wrong", 2, 0.9) < 0.1
    assert tokens.tolist() == [context[-3], truth[len(context) - 2]]  # by then 'right' is the one verified
    stats = combined.stats.report()
    assert stats["members"]["wrong"]["resolved_nodes"] >= 100 and stats["members"]["wrong"]["verified_per_step"] < 0.2
    assert stats["members"]["right"]["calibration_error"] < stats["members"]["right"]["raw_score_error"]


def test_calibration_counts_with_a_prior_and_forgets_slowly():
    cal = Calibration(weight=4.0, memory=1.0)
    assert cal.estimate("m", "k", 0.25) == 0.25
    for followed in (True, True, True, False):
        cal.update("m", "k", followed)
    assert cal.estimate("m", "k", 0.25) == pytest.approx((3 + 4 * 0.25) / (4 + 4))
    forgetting = Calibration(weight=0.0, memory=0.5)
    forgetting.update("m", "k", False)
    forgetting.update("m", "k", True)
    assert forgetting.estimate("m", "k", 0.0) == pytest.approx(1 / 1.5)


def test_members_receive_the_columns_of_their_feature_layers():
    a, b = Fixed([1], [0], [0.5], layers=[1, 2]), Fixed([2], [0], [0.5], layers=[2, 3])
    combined = Combined([a, b, Fixed([3], [0], [0.5])], names=["a", "b", "none"])
    assert combined.feature_layers == [1, 2, 3]
    features = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 12)  # 3 layers of width 4
    combined.reset(features)
    combined.observe(features[:1])
    assert torch.equal(a.seen[0][1], features[:, :8]) and torch.equal(b.seen[0][1], features[:, 4:])
    assert torch.equal(b.seen[1][1], features[:1, 4:]) and combined.proposers[2].seen == [
        ("reset", None),
        ("observe", None),
    ]
    # A draft reading a layer twice (a target with few layers): the first member's list as it is.
    a, b = Fixed([1], [0], [0.5], layers=[2, 3, 3]), Fixed([2], [0], [0.5], layers=[3, 4])
    combined = Combined([a, b], names=["a", "b"])
    assert combined.feature_layers == [2, 3, 3, 4]
    layer = {i: torch.full((2, 4), float(i)) for i in (2, 3, 4)}  # the target's hidden states, width 4
    combined.reset(torch.cat([layer[i] for i in combined.feature_layers], -1))
    assert torch.equal(a.seen[0][1], torch.cat([layer[2], layer[3], layer[3]], -1))
    assert torch.equal(b.seen[0][1], torch.cat([layer[3], layer[4]], -1))


@pytest.fixture(scope="module")
def tiny(predictable_target):
    from torchspec_ext.target import load_target

    model, tokenizer = load_target(str(predictable_target))
    return model.float(), tokenizer


def greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(ids) :].tolist()


def test_several_proposers_decode_as_greedy_decoding(tiny):
    model, tokenizer = tiny
    ids = tokenizer("The cat sat on the mat. The cat sat on the", add_special_tokens=False).input_ids
    want = greedy(model, ids, 40)
    cache = SuffixCache()
    members = [TreeProposer(TargetAsDraft(model), TreeSpec(3, 2, 6)), PromptLookup(8), SuffixDecoding(cache)]
    result = speculative_generate(model, members, ids, 40, eos_token_id=[])
    assert result.tokens == want
    assert result.acceptance_length > 2  # the target as its own draft, and the repeating text
    alone = speculative_generate(model, PromptLookup(8), ids, 40, eos_token_id=[])
    listed = speculative_generate(model, [PromptLookup(8)], ids, 40, eos_token_id=[])
    assert listed.tokens == alone.tokens == want and listed.accepted_per_step == alone.accepted_per_step


def test_the_cache_of_earlier_outputs_proposes_a_repeated_answer(tiny_target):
    """The random tiny target's answer is not repetitive: alone, the request proposes nearly nothing;
    with the answer cached, each step proposes as many tokens as it matched (SuffixDecoding's adaptive
    length, alpha 1), 1, 3, 7, 15, all accepted."""
    from torchspec_ext.target import load_target

    model, tokenizer = load_target(str(tiny_target))
    ids = tokenizer("Tell me about the sea.", add_special_tokens=False).input_ids
    cache = SuffixCache()
    first = speculative_generate(model.float(), SuffixDecoding(cache), ids, 32, eos_token_id=[])
    cache.add(first.tokens)
    again = speculative_generate(model, SuffixDecoding(cache), ids, 32, eos_token_id=[])
    assert again.tokens == first.tokens == greedy(model, ids, 32)
    assert first.target_forwards > 24 and again.accepted_per_step[:5] == [0, 1, 3, 7, 15]


def test_modes_and_proposers_for_eval():
    from torchspec_ext import drafts

    eagle = drafts.family("eagle3")
    modes = evaluation_modes(eagle, depth=4, topk=4, max_nodes=16, min_prob=0.15, lookup_tokens=10)
    assert list(modes) == ["chain", "tree", "chain, p >= 0.15", "tree, p >= 0.15", "lookup", "suffix", "combined"]
    assert modes["combined"].tree == TreeSpec(4, 4, 16, 0.15) and modes["combined"].depth == 16  # pruned
    lookup_modes = evaluation_modes(drafts.family("lookup"), 4, 4, 16, 0.0)
    assert list(lookup_modes) == ["lookup", "suffix", "combined"] and lookup_modes["combined"].tree is None
    assert list(evaluation_modes(drafts.family("suffix"), 4, 4, 16, 0.0)) == ["suffix", "lookup", "combined"]
    combined = build_proposer(None, None, CombinationSpec(None, LookupSpec(5), SuffixSpec(8), max_nodes=12))
    assert combined.names == ["lookup", "suffix"] and combined.max_nodes == 12
    assert len(output_caches(combined)) == 1 and output_caches(build_proposer(None, None, LookupSpec())) == []

    class Unscored:  # a proposer without propose_scored: tracked by depth, its prior 0.5 a level
        def propose(self, context):
            return torch.tensor([context[-1], 5, 6, 7]), torch.tensor([-1, 0, 1, 0])

    tree = scored(Unscored(), [1, 2])
    assert (tree.tokens, tree.prior, tree.keys) == ([2, 5, 6, 7], [1.0, 0.5, 0.25, 0.5], [None, 1, 2, 1])


def test_eval_rows_for_each_proposer_and_the_combination(predictable_target, tmp_path, capsys):
    from torchspec_ext.eval import main as eval_main
    from torchspec_ext.evalreport import markdown

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Repeat after me: one two three, one two three.", "Tell me something."]))
    shape = "--max-new-tokens 16 --depth 3 --topk 2 --max-nodes 6 --min-prob 0 --dtype float32 --json".split()
    argv = ["--target", str(predictable_target), "--draft", "target", "--prompts", str(prompts), *shape]
    assert eval_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["mode"]: r for r in report["rows"]}
    assert list(rows) == ["plain", "prompt lookup", "chain", "tree", "lookup", "suffix", "combined"]
    for r in rows.values():  # greedy, float32: every output is plain decoding's
        assert r["same_as_plain"] == r["compared_with_plain"] == 2
    assert rows["combined"]["acceptance_length"] > 2  # it holds the target's own tree
    costs = report["header"]["combination"]["combined"]
    assert set(costs["members"]) == {"target", "lookup", "suffix"}
    assert costs["steps"] == rows["combined"]["target_forwards"] and costs["forward_ms_per_step"] > 0
    assert costs["merge_ms_per_step"] > 0 and costs["verified_nodes_per_step"] <= 6
    assert report["header"]["modes"]["combined"]["tree"]["depth"] == 3
    cost = report["header"]["node_cost"]  # measured at the start, as no --node-cost was given
    assert cost >= 0 and report["header"]["modes"]["combined"]["node_cost"] == cost
    text = markdown(report)  # the table a user reads: the step's costs beside the forward's, per member
    assert "combined: building the tree" in text and f"forward {costs['forward_ms_per_step']:.2f} ms" in text
    assert all(f"| {member} | " in text for member in ("target", "lookup", "suffix"))


def test_the_held_out_check_measures_the_combination(tiny):
    from torchspec_ext import drafts
    from torchspec_ext.training.evaluation import HeldOutCheck

    model, tokenizer = tiny
    family = drafts.family("eagle3")
    options = family.options({"draft_vocab": 512})
    ids = tokenizer("One two three, one two three, one two", add_special_tokens=False).input_ids
    draft = family.new_draft(model, [(torch.tensor(ids), torch.ones(len(ids), dtype=torch.bool))], options)
    check = HeldOutCheck(model, family, [ids], 12, depth=3, topk=2, nodes=6, eos=[])
    found = check(draft)
    assert set(found) == {"acceptance_length", "tree_acceptance_length", "combined_acceptance_length",
                          "best_mode", "best_speedup"}  # fmt: skip
    assert found["best_mode"] in check.modes and found["combined_acceptance_length"] >= 1
    assert found["best_speedup"] > 0 and check.plain_tokens_per_s > 0
    assert "combined (the tree, prompt lookup and suffix decoding, 6 nodes at most)" in check.describe(found)
    assert f"best: {found['best_mode']}, " in check.describe(found)
    timed, cost = check.plain_tokens_per_s, check.node_cost
    assert cost >= 0 and check.modes["combined"].node_cost == cost and check.modes["combined"].tree.min_prob > 0
    check(draft)
    assert check.plain_tokens_per_s == timed and check.node_cost == cost  # plain decoding and a node timed once a run
