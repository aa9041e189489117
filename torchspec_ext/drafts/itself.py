"""The target as its own draft: no training, every proposal the target's own (one full forward per
tree level, no cache). A ceiling on acceptance, and what the tests check losslessness with."""

from __future__ import annotations

from torchspec_ext.drafts.base import DraftFamily
from torchspec_ext.speculate import Proposer, TargetAsDraft, TreeProposer, TreeSpec


class TargetItselfFamily(DraftFamily):
    name = "target"
    title = "the target itself"
    trainable = False

    def untrained_draft(self, target) -> TargetAsDraft:
        return TargetAsDraft(target)

    def proposer(self, draft: TargetAsDraft, spec: TreeSpec) -> Proposer:
        return TreeProposer(draft, spec)
