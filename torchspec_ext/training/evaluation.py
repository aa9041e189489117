"""The run's held-out check: the draft's greedy acceptance length on held-out prompts, decoded by the
same evaluation loop as ``python -m torchspec_ext.eval``, in the modes the draft family offers and
combined with prompt lookup and suffix decoding (``drafts.combined``); it names the best of them by
their measured speed-up over plain decoding of the same prompts."""

from __future__ import annotations

import copy
from dataclasses import replace

from torchspec_ext.drafts.base import DraftFamily
from torchspec_ext.drafts.combined import MIN_PROB, NODE_COST, CombinationSpec, combination_spec, fit_modes
from torchspec_ext.small_rows import enable_small_rows
from torchspec_ext.speculate import TreeSpec, measure_node_cost

COMBINED = "combined"


class HeldOutCheck:
    """``check(draft)`` -> ``{"acceptance_length": chain's, "tree_acceptance_length": tree's (when
    the evaluation has trees), "combined_acceptance_length": the draft's tree, prompt lookup and suffix
    decoding verified together, "best_mode" and "best_speedup"}`` on ``prompts``, greedy,
    ``new_tokens`` each; on the target's device (a copy of the draft there when the draft is elsewhere,
    as in a job with a sharded teacher). The best mode is the one with the most tokens/s; its speed-up
    is over plain decoding of the same prompts, timed at the first check (the target does not change
    during a run). The timings are this process's own: other work on the machine shows in them."""

    def __init__(
        self, target, family: DraftFamily, prompts, new_tokens: int, depth: int, topk: int, nodes: int, eos,
        node_cost: float | None = None,
    ):  # fmt: skip
        self.target, self.family, self.prompts, self.new_tokens, self.eos = target, family, prompts, new_tokens, eos
        self.plain_tokens_per_s: float | None = None
        self.node_cost = node_cost  # None: measured at the first check, as plain decoding is timed
        self.modes = dict(family.decode_modes(depth, topk, nodes, 0.0))
        tree = TreeSpec(depth, topk, nodes, MIN_PROB)
        self.modes[COMBINED] = combination_spec(tree, nodes, node_cost=NODE_COST if node_cost is None else node_cost)

    def _key(self, name: str) -> str:
        return "acceptance_length" if name == next(iter(self.modes)) else f"{name}_acceptance_length"

    def __call__(self, draft) -> dict:
        from torchspec_ext.eval import measure_modes, plain_tokens_per_s

        device = next(self.target.parameters()).device
        if next(draft.parameters()).device != device:
            draft = copy.deepcopy(draft).to(device)
        enable_small_rows(draft, bfloat16_copy=True)  # as a loaded draft decodes; training keeps the usual way
        self.modes = fit_modes(self.family, draft, self.modes)  # the draft's shape is the run's: the same each call
        if self.plain_tokens_per_s is None:
            self.plain_tokens_per_s = plain_tokens_per_s(self.target, self.prompts, self.new_tokens, self.eos)
        if self.node_cost is None and self.prompts:
            self.node_cost = measure_node_cost(self.target, self.prompts[0])
            self.modes[COMBINED] = replace(self.modes[COMBINED], node_cost=self.node_cost)
        found = measure_modes(self.target, self.family, draft, self.prompts, self.new_tokens, self.modes, self.eos)
        best = max(found, key=lambda name: found[name].tokens_per_s)
        values = {self._key(name): m.acceptance_length for name, m in found.items()}
        speedup = found[best].tokens_per_s / self.plain_tokens_per_s if self.plain_tokens_per_s else 0.0
        return values | {"best_mode": best, "best_speedup": speedup}

    def describe(self, found: dict) -> str:
        parts = []
        for name, spec in self.modes.items():
            if isinstance(spec, CombinationSpec):
                shape = f"{name} (the tree, prompt lookup and suffix decoding, {spec.max_nodes} nodes at most)"
            elif spec.topk == 1:
                shape = f"{name} of {spec.depth}"
            else:
                shape = f"{name} (depth {spec.depth}, top-{spec.topk}, {spec.max_nodes} nodes)"
            parts.append(f"{shape} {found[self._key(name)]:.2f}")
        best = f"; best: {found['best_mode']}, {found['best_speedup']:.2f}x plain decoding's tokens/s"
        return ", ".join(parts) + best
