"""Acceptance statistics of speculative decoding, counted as SGLang and vLLM count theirs, summed
over the decodes of a run per set, category, turn and mode (pure arithmetic: no model here).

Two acceptance lengths (docs/evaluation.md cites the engines' code):

- ``acceptance_length``: tokens emitted per target (verify) forward, the tokens cut at the stop
  token and at the new-token limit. Ours (:class:`~torchspec_ext.speculate.SpeculativeResult`) and
  SGLang's ("accept len": accepted draft tokens + 1 per verify step, cut where a request finishes).
- ``acceptance_length_vllm``: 1 + accepted draft tokens per drafting step, not cut at the stop
  (vLLM's "Mean acceptance length", ``1 + num_accepted_tokens / num_drafts``); steps that proposed
  no draft token are not drafting steps.

and vLLM's per-position acceptance rate: for each draft position i, the fraction of drafting
steps whose first i + 1 draft tokens were all accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass
class Decode:
    """One decode of one prompt turn in one mode, as the evaluation loop measured it."""

    set: str
    category: str
    item: str
    turn: int
    mode: str
    tokens: int  # emitted (the stop token included, nothing after it)
    seconds: float
    forwards: int  # target forwards that emitted tokens (verify steps; plain decoding: one a token)
    accepted_per_step: Sequence[int] | None = None  # speculative modes: accepted draft tokens of each verify step
    drafted_per_step: Sequence[int] | None = None  # draft tokens proposed at each step (None: every step proposed)
    same_as_plain: bool | None = None  # output equal to plain decoding's (None: not compared)
    agreeing_tokens: int | None = None  # tokens equal to plain decoding's before the first difference


def drafting_steps(accepted_per_step: Sequence[int], drafted_per_step: Sequence[int] | None = None) -> list[int]:
    """The accepted counts of the steps that proposed at least one draft token (vLLM's drafts)."""
    if any(a < 0 for a in accepted_per_step):
        raise ValueError(f"accepted_per_step must be >= 0, got {list(accepted_per_step)}")
    if drafted_per_step is None:
        return list(accepted_per_step)
    if len(drafted_per_step) != len(accepted_per_step):
        raise ValueError(
            f"drafted_per_step has {len(drafted_per_step)} steps, accepted_per_step {len(accepted_per_step)}"
        )
    for accepted, drafted in zip(accepted_per_step, drafted_per_step):
        if not 0 <= accepted <= drafted:
            raise ValueError(f"a step accepted {accepted} of {drafted} draft tokens")
    return [a for a, d in zip(accepted_per_step, drafted_per_step) if d > 0]


def per_position_acceptance(
    accepted_per_step: Sequence[int], positions: int, drafted_per_step: Sequence[int] | None = None
) -> list[float]:
    """vLLM's per-position acceptance rate: for i < ``positions``, the fraction of drafting steps
    that accepted more than i draft tokens (empty if no step drafted)."""
    steps = drafting_steps(accepted_per_step, drafted_per_step)
    if not steps:
        return []
    return [sum(a > i for a in steps) / len(steps) for i in range(positions)]


def _group_key(decode: Decode, by: Sequence[str]) -> tuple:
    return tuple(getattr(decode, name) for name in by)


def aggregate(
    decodes: Iterable[Decode], by: Sequence[str] = ("set", "mode"), baseline: str = "plain", positions=None
) -> list[dict]:
    """One row per group of ``decodes`` sharing the fields ``by`` (which must include "mode"), in
    order of first appearance: sums, both acceptance lengths, per-position acceptance rates (to
    ``positions``: an int, or a mapping from mode to its depth; default, or a mode the mapping lacks:
    the most draft tokens any step of the group proposed or accepted),
    tokens/s, and the speed-up over the ``baseline`` mode's row of the same group."""
    by = tuple(by)
    if "mode" not in by:
        raise ValueError(f"aggregate: 'by' must include 'mode', got {by}")
    for name in by:
        if name not in Decode.__dataclass_fields__:
            raise ValueError(f"aggregate: unknown field {name!r}")
    groups: dict[tuple, list[Decode]] = {}
    for decode in decodes:
        groups.setdefault(_group_key(decode, by), []).append(decode)
    rows = []
    for key, members in groups.items():
        tokens = sum(d.tokens for d in members)
        seconds = sum(d.seconds for d in members)
        forwards = sum(d.forwards for d in members)
        row = dict(zip(by, key))
        row.update(
            decodes=len(members),
            tokens=tokens,
            seconds=seconds,
            target_forwards=forwards,
            acceptance_length=tokens / forwards if forwards else None,
            tokens_per_s=tokens / seconds if seconds > 0 else None,
            same_as_plain=sum(d.same_as_plain is True for d in members),
            compared_with_plain=sum(d.same_as_plain is not None for d in members),
            agreeing_tokens=sum(d.agreeing_tokens or 0 for d in members),
        )
        stepped = [d for d in members if d.accepted_per_step is not None]
        if stepped:
            steps = [a for d in stepped for a in drafting_steps(d.accepted_per_step, d.drafted_per_step)]
            drafted = [n for d in stepped for n in (d.drafted_per_step or ())]
            known_drafted = all(d.drafted_per_step is not None for d in stepped)
            limit = positions.get(row["mode"]) if isinstance(positions, Mapping) else positions
            depth = limit if limit is not None else max([*steps, *drafted, 0])
            row.update(
                drafting_steps=len(steps),
                accepted_draft_tokens=sum(steps),
                acceptance_length_vllm=1 + sum(steps) / len(steps) if steps else None,
                draft_tokens=sum(drafted) if known_drafted else None,
                draft_acceptance_rate=sum(steps) / sum(drafted) if known_drafted and sum(drafted) else None,
                per_position_acceptance=per_position_acceptance(steps, depth),
            )
        rows.append(row)
    index = {tuple(row[name] for name in by): row for row in rows}
    mode_at = by.index("mode")
    for key, row in index.items():
        base = index.get(key[:mode_at] + (baseline,) + key[mode_at + 1 :])
        rate, base_rate = row["tokens_per_s"], base["tokens_per_s"] if base else None
        row["speedup"] = rate / base_rate if rate is not None and base_rate else None
        base_tokens = base["tokens"] if base else None
        row["agreeing_fraction"] = row["agreeing_tokens"] / base_tokens if base_tokens else None
    return rows
