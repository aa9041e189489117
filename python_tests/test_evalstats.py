"""Acceptance statistics: both engines' acceptance lengths, vLLM's per-position rates, and the
per-set / per-category / per-mode sums, on hand-built runs with exact expected numbers."""

import pytest

from torchspec_ext.evalstats import Decode, aggregate, drafting_steps, per_position_acceptance


def test_per_position_acceptance_is_vllms():
    # Steps that accepted 0, 2, 4, 1 and 4 of 4 draft tokens: position i is accepted in the steps
    # that accepted more than i tokens (vLLM adds 1 to positions 0..n-1 of a step that accepted n).
    assert per_position_acceptance([0, 2, 4, 1, 4], 4) == [4 / 5, 3 / 5, 2 / 5, 2 / 5]
    assert per_position_acceptance([0, 2, 4, 1, 4], 6) == [4 / 5, 3 / 5, 2 / 5, 2 / 5, 0.0, 0.0]
    # A step that proposed nothing (a pruned tree of the root alone) is no draft for vLLM.
    assert per_position_acceptance([0, 2, 0, 4], 4, drafted_per_step=[4, 4, 0, 4]) == [2 / 3, 2 / 3, 1 / 3, 1 / 3]
    assert per_position_acceptance([0, 0], 2, drafted_per_step=[0, 0]) == []
    assert per_position_acceptance([], 3) == []
    with pytest.raises(ValueError, match="accepted 3 of 2"):
        drafting_steps([3], [2])
    with pytest.raises(ValueError, match="2 steps, accepted_per_step 1"):
        drafting_steps([1], [2, 2])
    with pytest.raises(ValueError, match=">= 0"):
        per_position_acceptance([1, -1], 2)


def spec(set_, category, item, mode, tokens, seconds, accepted, drafted=None, same=None, turn=0):
    return Decode(set_, category, item, turn, mode, tokens, seconds, len(accepted), accepted, drafted, same)


def plain(set_, category, item, tokens, seconds, turn=0):
    return Decode(set_, category, item, turn, "plain", tokens, seconds, tokens, None, None, None)


def test_both_acceptance_lengths_differ_only_where_a_step_was_cut():
    # Three verify steps accepting 3, 1 and 4 draft tokens: 4 + 2 + 5 tokens, but the stop token
    # came third in the last step, so 4 + 2 + 3 = 9 were emitted.
    (row,) = aggregate([spec("s", "c", "0", "chain", 9, 1.0, [3, 1, 4], same=True)])
    assert row["acceptance_length"] == 9 / 3  # ours and SGLang's: emitted per verify forward
    assert row["acceptance_length_vllm"] == 1 + 8 / 3  # vLLM's: 1 + accepted per draft, not cut at the stop
    assert row["accepted_draft_tokens"] == 8 and row["drafting_steps"] == 3
    assert row["per_position_acceptance"] == [1.0, 2 / 3, 2 / 3, 1 / 3]
    assert row["draft_tokens"] is None and row["draft_acceptance_rate"] is None
    # Uncut, they agree.
    (row,) = aggregate([spec("s", "c", "0", "chain", 11, 1.0, [3, 1, 4])])
    assert row["acceptance_length"] == row["acceptance_length_vllm"] == 11 / 3


def test_pruned_steps_count_as_forwards_but_not_as_vllm_drafts():
    decode = spec("s", "c", "0", "tree, p >= 0.15", 6, 1.0, [2, 0, 1], drafted=[3, 0, 2])
    (row,) = aggregate([decode], positions=3)
    assert row["acceptance_length"] == 6 / 3 and row["target_forwards"] == 3
    assert row["drafting_steps"] == 2 and row["acceptance_length_vllm"] == 1 + 3 / 2
    assert row["draft_tokens"] == 5 and row["draft_acceptance_rate"] == 3 / 5
    assert row["per_position_acceptance"] == [1.0, 1 / 2, 0.0]


def test_each_mode_has_the_positions_of_its_own_depth():
    decodes = [spec("s", "c", "0", "chain", 4, 1.0, [1, 1]), spec("s", "c", "0", "lookup", 7, 1.0, [5, 0])]
    rows = {r["mode"]: r for r in aggregate(decodes, by=("mode",), positions={"chain": 2, "lookup": 6})}
    assert rows["chain"]["per_position_acceptance"] == [1.0, 0.0]
    assert rows["lookup"]["per_position_acceptance"] == [1 / 2] * 5 + [0.0]
    rows = {r["mode"]: r for r in aggregate(decodes, by=("mode",), positions={"chain": 3})}
    assert len(rows["lookup"]["per_position_acceptance"]) == 5  # not given: the most a step accepted


def test_rows_per_set_category_and_mode_with_speedup_over_plain():
    decodes = [
        plain("mt-bench", "math", "111", 10, 2.0),
        spec("mt-bench", "math", "111", "chain", 10, 1.0, [1, 3, 2, 0], same=True),
        plain("mt-bench", "math", "111", 6, 1.0, turn=1),
        spec("mt-bench", "math", "111", "chain", 6, 0.5, [2, 2], same=False, turn=1),
        plain("mt-bench", "coding", "125", 8, 2.0),
        spec("mt-bench", "coding", "125", "chain", 8, 2.0, [4, 2], same=True),
        plain("humaneval", "humaneval", "HumanEval/3", 5, 1.0),
        spec("humaneval", "humaneval", "HumanEval/3", "chain", 5, 0.25, [4], same=True),
    ]
    rows = {(r["set"], r["mode"]): r for r in aggregate(decodes, positions=4)}
    assert list(rows) == [("mt-bench", "plain"), ("mt-bench", "chain"), ("humaneval", "plain"), ("humaneval", "chain")]
    mt_plain, mt_chain = rows["mt-bench", "plain"], rows["mt-bench", "chain"]
    assert (mt_plain["tokens"], mt_plain["seconds"], mt_plain["target_forwards"]) == (24, 5.0, 24)
    assert mt_plain["acceptance_length"] == 1.0 and mt_plain["speedup"] == 1.0
    assert "acceptance_length_vllm" not in mt_plain and mt_plain["compared_with_plain"] == 0
    assert (mt_chain["tokens"], mt_chain["seconds"], mt_chain["target_forwards"]) == (24, 3.5, 8)
    assert mt_chain["acceptance_length"] == 24 / 8 and mt_chain["acceptance_length_vllm"] == 1 + 16 / 8
    assert mt_chain["speedup"] == (24 / 3.5) / (24 / 5.0)
    assert (mt_chain["same_as_plain"], mt_chain["compared_with_plain"], mt_chain["decodes"]) == (2, 3, 3)
    # Accepted 1,3,2,0,2,2,4,2: more than 0 in 7 of 8 steps, more than 1 in 6, than 2 in 2, than 3 in 1.
    assert mt_chain["per_position_acceptance"] == [7 / 8, 6 / 8, 2 / 8, 1 / 8]
    assert rows["humaneval", "chain"]["speedup"] == 4.0
    by_category = {(r["category"], r["mode"]): r for r in aggregate(decodes, by=("set", "category", "mode"))}
    assert by_category["math", "chain"]["speedup"] == (16 / 1.5) / (16 / 3.0)
    assert by_category["coding", "chain"]["speedup"] == 1.0
    assert by_category["coding", "chain"]["per_position_acceptance"] == [1.0, 1.0, 0.5, 0.5]  # depth inferred: 4
    by_turn = {(r["turn"], r["mode"]): r for r in aggregate(decodes, by=("set", "turn", "mode"))}
    assert by_turn[1, "chain"]["acceptance_length"] == 3.0 and by_turn[1, "chain"]["same_as_plain"] == 0


def test_no_baseline_no_speedup_and_bad_grouping():
    (row,) = aggregate([spec("s", "c", "0", "chain", 4, 1.0, [3])])
    assert row["speedup"] is None and row["tokens_per_s"] == 4.0
    (row,) = aggregate([spec("s", "c", "0", "chain", 4, 0.0, [3])])
    assert row["tokens_per_s"] is None and row["speedup"] is None
    with pytest.raises(ValueError, match="must include 'mode'"):
        aggregate([], by=("set",))
    with pytest.raises(ValueError, match="unknown field 'dataset'"):
        aggregate([], by=("dataset", "mode"))
    assert aggregate([]) == []
