"""The run's held-out check: the draft's greedy acceptance length on held-out prompts, decoded by the
same evaluation loop as ``python -m torchspec_ext.eval``, in the modes the draft family offers."""

from __future__ import annotations

import copy

from torchspec_ext.drafts.base import DraftFamily


class HeldOutCheck:
    """``check(draft)`` -> ``{"acceptance_length": chain's, "tree_acceptance_length": tree's (when
    the evaluation has trees)}`` on ``prompts``, greedy, ``new_tokens`` each; on the target's device
    (a copy of the draft there when the draft is elsewhere, as in a job with a sharded teacher)."""

    def __init__(self, target, family: DraftFamily, prompts, new_tokens: int, depth: int, topk: int, nodes: int, eos):
        self.target, self.family, self.prompts, self.new_tokens, self.eos = target, family, prompts, new_tokens, eos
        self.modes = family.decode_modes(depth, topk, nodes, 0.0)

    def __call__(self, draft) -> dict[str, float]:
        from torchspec_ext.eval import acceptance_lengths

        device = next(self.target.parameters()).device
        if next(draft.parameters()).device != device:
            draft = copy.deepcopy(draft).to(device)
        self.modes = self.family.fit_modes(draft, self.modes)  # the draft's shape is the run's: the same each call
        found = acceptance_lengths(self.target, self.family, draft, self.prompts, self.new_tokens, self.modes, self.eos)
        first = next(iter(self.modes))
        return {"acceptance_length" if name == first else f"{name}_acceptance_length": v for name, v in found.items()}

    def describe(self, found: dict[str, float]) -> str:
        parts = []
        for name, spec in self.modes.items():
            value = found["acceptance_length" if name == next(iter(self.modes)) else f"{name}_acceptance_length"]
            shape = (
                f"{name} of {spec.depth}"
                if spec.topk == 1
                else (f"{name} (depth {spec.depth}, top-{spec.topk}, {spec.max_nodes} nodes)")
            )
            parts.append(f"{shape} {value:.2f}")
        return ", ".join(parts)
