"""The benchmarks' shared target cells (``target`` and ``verdict``) and the names common.py still lends."""

from torchspec_ext.bench.common import Goal, target, verdict

FAST = Goal("speed-up ≥ 2x", lambda row: row["speedup"] < 2, "speed-up")
SMALL = Goal("extra mem < 5% of logits", lambda row: not row.get("extra", 1.0) < 0.05, "memory")


def test_target_lists_the_goals_or_is_none():
    assert target([FAST, SMALL]) == "speed-up ≥ 2x, extra mem < 5% of logits"
    assert target([]) is None


def test_verdict_wrong_first_then_pass_or_the_goals_missed():
    assert verdict([FAST, SMALL], {"speedup": 3.0, "extra": 0.01}) == "PASS"
    assert verdict([FAST, SMALL], {"speedup": 1.0}) == "MISS (speed-up, memory)"
    assert verdict([FAST, SMALL], {"speedup": 3.0}, "WRONG (max err 0.1)") == "WRONG (max err 0.1)"
    assert verdict([], {"speedup": 1.0}) is None and verdict([], {}, "WRONG") == "WRONG"
    # A goal without a name (a row's only target) misses as a plain MISS.
    assert verdict([Goal("slowdown < 5%", lambda row: row["slowdown"] >= 0.05)], {"slowdown": 0.1}) == "MISS"
