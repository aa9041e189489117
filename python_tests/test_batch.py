"""Several sequences decoded together (SpeculativeBatch): each generates what it would alone."""

import pytest
import torch

from torchspec_ext.drafts.lookup import PromptLookup
from torchspec_ext.speculate import SpeculativeBatch, TargetAsDraft, TreeProposer, TreeSpec, speculative_generate
from torchspec_ext.target import load_target


@pytest.fixture(scope="module")
def target():
    model, tokenizer = load_target()
    return model.float(), tokenizer


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def proposers(model):
    """Fresh proposers of different shapes: a tree, a chain, prompt lookup (a proposer keeps one
    sequence's state, so each sequence gets its own)."""
    return [
        TreeProposer(TargetAsDraft(model), TreeSpec(3, 2, 6)),
        TreeProposer(TargetAsDraft(model), TreeSpec.chain(2)),
        PromptLookup(6),
    ]


def test_each_sequence_of_a_batch_generates_what_it_would_alone(target):
    model, tokenizer = target
    prompts = [
        ids_of(tokenizer, "The cat sat on the mat. The cat sat on the"),
        ids_of(tokenizer, "Write a Python function that adds two numbers and returns the result."),
        ids_of(tokenizer, "One"),  # one token: nothing to prefill
    ]
    assert len(prompts[2]) == 1
    lengths = [20, 7, 12]  # they end at different steps
    alone = [
        speculative_generate(model, p, ids, n, eos_token_id=[]) for p, ids, n in zip(proposers(model), prompts, lengths)
    ]
    batch = SpeculativeBatch(model)
    seqs = [batch.add(p, ids, n, eos_token_id=[]) for p, ids, n in zip(proposers(model), prompts, lengths)]
    assert len(batch.sequences) == 3
    ended = []
    while batch.sequences:
        ended += batch.step()
    assert {id(s) for s in ended} == {id(s) for s in seqs} and all(s.done for s in seqs)
    for seq, solo in zip(seqs, alone):
        assert seq.result.tokens == solo.tokens
        assert seq.result.accepted_per_step == solo.accepted_per_step  # the same trees, verified the same
    assert batch.cache is None  # every row left


def test_sequences_join_and_leave_a_running_batch(target):
    model, tokenizer = target
    first = ids_of(tokenizer, "List the days of the week: Monday, Tuesday,")
    later = ids_of(tokenizer, "Count to ten: one, two, three,")
    want_first = speculative_generate(model, proposers(model)[0], first, 16, eos_token_id=[]).tokens
    want_later = speculative_generate(model, proposers(model)[2], later, 10, eos_token_id=[]).tokens
    batch = SpeculativeBatch(model)
    a = batch.add(proposers(model)[0], first, 16, eos_token_id=[])
    batch.step()
    b = batch.add(proposers(model)[2], later, 10, eos_token_id=[])  # joins with a longer cache beside it
    while batch.sequences:
        batch.step()
    assert a.result.tokens == want_first and b.result.tokens == want_later


def test_sampling_in_a_batch_is_each_sequence_own(target):
    model, tokenizer = target
    prompt = ids_of(tokenizer, "Tell me a story about a dragon.")

    def run(batched: bool):
        batch = SpeculativeBatch(model)
        seqs = []
        for seed in (1, 2):
            gen = torch.Generator().manual_seed(seed)
            seqs.append(batch.add(proposers(model)[0], prompt, 12, temperature=0.8, eos_token_id=[], generator=gen))
            if not batched:
                while batch.sequences:
                    batch.step()
        while batch.sequences:
            batch.step()
        return [s.result.tokens for s in seqs]

    assert run(True) == run(False)  # each sequence draws from its own generator, batch or not


def test_on_step_can_end_one_sequence_of_a_batch(target):
    model, tokenizer = target
    prompt = ids_of(tokenizer, "The cat sat on the mat. The cat sat on the")
    seen = []
    stop_after_two = lambda tokens, features, logits: seen.append(list(tokens)) or len(seen) > 2
    batch = SpeculativeBatch(model)
    stopped = batch.add(proposers(model)[2], prompt, 30, eos_token_id=[], on_step=stop_after_two)
    going = batch.add(proposers(model)[2], prompt, 30, eos_token_id=[])
    while batch.sequences:
        batch.step()
    assert stopped.done and stopped.result.target_forwards == 2 and len(going.result.tokens) == 30
    assert going.result.tokens[: len(stopped.result.tokens)] == stopped.result.tokens


class FeatureRecorder(PromptLookup):
    """Prompt lookup that reads the target's hidden states 2 and 5 and keeps what it is given."""

    feature_layers = (2, 5)

    def __init__(self):
        super().__init__(4)
        self.seen = []

    def reset(self, features):
        self.seen = [features]

    def observe(self, features):
        self.seen.append(features)


def test_each_sequence_observes_the_features_of_its_own_row(target):
    model, tokenizer = target
    prompts = [
        ids_of(tokenizer, "The cat sat on the mat. The cat sat on the mat. The cat"),
        ids_of(tokenizer, "Describe the sea in one sentence."),
    ]
    alone = []
    for ids in prompts:
        alone.append(FeatureRecorder())
        speculative_generate(model, alone[-1], ids, 10, eos_token_id=[])
    batch = SpeculativeBatch(model)
    together = [FeatureRecorder() for _ in prompts]
    for proposer, ids in zip(together, prompts):
        batch.add(proposer, ids, 10, eos_token_id=[])
    while batch.sequences:
        batch.step()
    for mine, solo in zip(together, alone):
        assert len(mine.seen) == len(solo.seen) > 2
        for a, b in zip(mine.seen, solo.seen):
            assert a.shape == b.shape == (a.shape[0], 2 * model.config.hidden_size)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
