"""The draft families' registry and interface, prompt lookup (a proposer without training), and the
typed teacher batch every family trains on."""

from __future__ import annotations

import json

import pytest
import torch

from torchspec_ext import drafts
from torchspec_ext.drafts.base import DraftLoadError
from torchspec_ext.drafts.lookup import PromptLookup, lookup_continuation
from torchspec_ext.speculate import TreeSpec, speculative_generate
from torchspec_ext.teacher import BatchError, TeacherBatch


def test_the_registry_names_each_family_once():
    assert set(drafts.FAMILIES) >= {"eagle3", "lookup", "target"}
    assert all(name == family.name for name, family in drafts.FAMILIES.items())
    assert drafts.TRAINABLE == [n for n, f in drafts.FAMILIES.items() if f.trainable] and "eagle3" in drafts.TRAINABLE
    with pytest.raises(KeyError, match="the families are"):
        drafts.family("medusa")


def test_a_folder_of_no_known_family_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MedusaModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(DraftLoadError, match=r"\['MedusaModel'\] is not a draft of any family here: EAGLE-3"):
        drafts.load_draft(tmp_path)


@pytest.mark.parametrize(
    ("context", "want"),
    [
        ([1, 2, 3, 9, 1, 2, 3], [9, 1, 2, 3]),  # the trigram 1 2 3 was followed by 9 1 2 3
        ([5, 6, 7, 5, 6, 8, 5, 6], [8, 5, 6]),  # the latest earlier match of 5 6 wins
        ([4, 4, 4, 4], [4]),  # runs of one token continue (the match may overlap the suffix)
        ([1, 2, 3], []),  # nothing repeats
        ([7], []),
    ],
)
def test_lookup_proposes_what_followed_the_latest_match(context, want):
    assert lookup_continuation(context, max_tokens=4) == want[:4]


def test_prompt_lookup_decodes_as_plain_greedy(predictable_target):
    from torchspec_ext.target import load_target

    target, _ = load_target(predictable_target)
    prompt = [5, 17, 42, 99, 5, 17, 42, 7]
    with torch.no_grad():
        want = target.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt) :].tolist()
    proposer = drafts.family("lookup").proposer(None, TreeSpec.chain(5))
    assert isinstance(proposer, PromptLookup)
    result = speculative_generate(target, proposer, prompt, 20, eos_token_id=[])
    assert result.tokens == want
    assert result.target_forwards < len(want)  # the predictable target repeats itself: lookup accepts


def batch_tensors(b=2, t=5, k=3, f=12) -> dict:
    return {
        "input_ids": torch.zeros(b, t, dtype=torch.long),
        "loss_mask": torch.ones(b, t, dtype=torch.bool),
        "features": torch.zeros(b, t, f),
        "teacher_indices": torch.zeros(b, t, k, dtype=torch.long),
        "teacher_logprobs": torch.zeros(b, t, k),
        "teacher_argmax": torch.zeros(b, t, dtype=torch.long),
        "batch_index": torch.tensor([7]),
    }


def test_a_teacher_batch_round_trips_through_its_tensors():
    batch = TeacherBatch.from_tensors(batch_tensors(), "test")
    assert batch.batch_index == 7
    again = TeacherBatch.from_tensors(batch.tensors(), "again")
    assert all(torch.equal(a, b) for a, b in zip(batch.tensors().values(), again.tensors().values()))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("features"), r"missing \['features'\]"),
        (lambda d: d.update(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
        (lambda d: d.update(loss_mask=torch.ones(2, 5)), "loss_mask must be bool"),
        (lambda d: d.update(teacher_logprobs=torch.zeros(2, 5, 4)), r"teacher_logprobs must be float32 \[2, 5, 3\]"),
        (lambda d: d.update(features=torch.zeros(2, 4, 12)), r"features must be floating \[2, 5, F\]"),
        (lambda d: d.update(batch_index=torch.tensor([1, 2])), "batch_index must be one int64"),
    ],
)
def test_a_malformed_teacher_batch_is_named(change, message):
    tensors = batch_tensors()
    change(tensors)
    with pytest.raises(BatchError, match=f"batch 3 from rank 0: .*{message}"):
        TeacherBatch.from_tensors(tensors, "batch 3 from rank 0")
