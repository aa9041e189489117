"""Speculative decoding on the real default target: identical to greedy decoding at temperature 0."""

import json
import math

import pytest
import torch

from torchspec_ext.speculate import (
    TargetAsDraft,
    TreeProposer,
    TreeSpec,
    measure_node_cost,
    propose_tree,
    speculative_generate,
)
from torchspec_ext.target import load_target


@pytest.fixture(scope="module")
def target():
    model, tokenizer = load_target()
    return model, tokenizer


def prompt_ids(tokenizer, text):
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False).input_ids


def greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids) :].tolist()


class UniformDraft:
    """A useless draft: every token equally likely (topk then picks the lowest ids)."""

    def __init__(self, vocab):
        self.vocab = vocab

    def next_logprobs(self, context, paths):
        return torch.full((len(paths), self.vocab), -float(torch.log(torch.tensor(self.vocab))))


@pytest.mark.parametrize("spec", [TreeSpec.chain(4), TreeSpec(depth=3, topk=2, max_nodes=12)])
def test_target_as_draft_matches_greedy_and_accepts_everything(target, spec):
    model, tokenizer = target
    ids = prompt_ids(tokenizer, "Name three colours of the rainbow.")
    want = greedy(model, ids, 16)
    result = speculative_generate(model, TreeProposer(TargetAsDraft(model), spec), ids, 16)
    assert result.tokens == want[: len(result.tokens)]
    assert len(result.tokens) == len(want)  # 16 tokens, or fewer only if greedy stopped at EOS too
    # Every step but the last accepts the whole depth (the last may stop at max_new_tokens).
    assert all(a == spec.depth for a in result.accepted_per_step[:-1])
    assert result.target_forwards == math.ceil(len(result.tokens) / (spec.depth + 1))


def test_useless_draft_still_matches_greedy(target):
    model, tokenizer = target
    ids = prompt_ids(tokenizer, "What is the capital of France?")
    want = greedy(model, ids, 12)
    proposer = TreeProposer(UniformDraft(model.config.vocab_size), TreeSpec(depth=2, topk=3, max_nodes=6))
    result = speculative_generate(model, proposer, ids, 12)
    assert result.tokens == want
    assert result.target_forwards >= len(result.tokens) - 2  # nearly nothing accepted: ~1 token per forward


def test_measured_node_cost_leaves_the_target_as_it_was(target):
    model, tokenizer = target
    ids = prompt_ids(tokenizer, "What is the capital of France?")
    want = greedy(model, ids, 8)
    for prompt, nodes in ((ids, 4), (ids[:1], 2)):  # a one-token prompt has no prefix to cache
        cost = measure_node_cost(model, prompt, nodes, repeats=1)
        assert math.isfinite(cost) and cost >= 0
    assert speculative_generate(model, TreeProposer(TargetAsDraft(model), TreeSpec.chain(3)), ids, 8).tokens == want
    assert greedy(model, ids, 8) == want
    with pytest.raises(ValueError, match="needs a prompt and nodes >= 1"):
        measure_node_cost(model, [], 4)
    with pytest.raises(ValueError, match="needs a prompt and nodes >= 1"):
        measure_node_cost(model, ids, 0)


def test_sampling_runs_and_is_reproducible(target):
    model, tokenizer = target
    ids = prompt_ids(tokenizer, "Tell me a fact about cats.")
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        runs.append(
            speculative_generate(
                model, TreeProposer(TargetAsDraft(model), TreeSpec.chain(3)), ids, 10, temperature=0.8, generator=gen
            )
        )
    assert runs[0].tokens == runs[1].tokens and len(runs[0].tokens) == 10
    assert all(0 <= t < model.config.vocab_size for t in runs[0].tokens)


def test_propose_tree_prunes_below_min_prob():
    class Halving:  # each level: one token of probability 0.5, the rest share the remainder
        def next_logprobs(self, context, paths):
            row = torch.full((10,), 0.5 / 9).log()
            row[3] = math.log(0.5)
            return row.repeat(len(paths), 1)

    tokens, parents = propose_tree(Halving(), [1], TreeSpec.chain(4, min_prob=0.2))
    assert tokens.tolist() == [1, 3, 3] and parents.tolist() == [-1, 0, 1]  # 0.5, 0.25, then 0.125 < 0.2
    tokens, _ = propose_tree(Halving(), [1], TreeSpec.chain(4, min_prob=0.6))
    assert tokens.tolist() == [1]  # the root alone: a plain decoding step


def test_propose_tree_shape():
    class Fixed:
        def next_logprobs(self, context, paths):
            return torch.log_softmax(torch.arange(10, dtype=torch.float32).repeat(len(paths), 1), -1)

    tokens, parents = propose_tree(Fixed(), [5, 6], TreeSpec(depth=3, topk=2, max_nodes=5))
    assert tokens[0] == 6 and parents[0] == -1
    assert len(tokens) == 6 and all(0 <= p < j for j, p in enumerate(parents.tolist()) if j)
    chain_tokens, chain_parents = propose_tree(Fixed(), [1], TreeSpec.chain(4))
    assert chain_tokens.tolist() == [1, 9, 9, 9, 9] and chain_parents.tolist() == [-1, 0, 1, 2, 3]


def test_eval_cli_reports_acceptance(capsys):
    from torchspec_ext.eval import main

    assert (
        main(
            [
                "--prompts",
                "sharegpt",
                "--limit",
                "2",
                "--max-new-tokens",
                "8",
                "--depth",
                "2",
                "--topk",
                "2",
                "--dtype",
                "float32",
                "--min-prob",
                "0.5",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    rows = {r["mode"]: r for r in report["rows"]}
    assert set(rows) == {
        "plain", "prompt lookup", "chain", "tree", "chain, p >= 0.5", "tree, p >= 0.5", "lookup", "suffix", "combined"
    }  # fmt: skip
    assert report["header"]["dtype"] == "float32"
    assert rows["plain"]["acceptance_length"] == 1.0 and rows["plain"]["target_forwards"] == rows["plain"]["tokens"]
    # The target as its own draft: each forward emits the whole depth plus the target's token.
    assert rows["chain"]["acceptance_length"] > 2 and rows["tree"]["acceptance_length"] > 2
    # Greedy: every mode decodes what plain decoding does, token for token.
    assert all(r["tokens"] == rows["plain"]["tokens"] and r["same_as_plain"] == 2 for r in rows.values())
    assert 0 < rows["prompt lookup"]["target_forwards"] <= rows["plain"]["tokens"]


def test_eval_cli_rejects_a_directory_that_is_not_a_draft():
    from torchspec_ext.eval import main

    # Named, and before the target loads; loading real drafts is tested in test_export.py.
    with pytest.raises(SystemExit, match="cannot load draft ./nonexistent.: not a draft directory"):
        main(["--draft", "/nonexistent", "--limit", "1"])
