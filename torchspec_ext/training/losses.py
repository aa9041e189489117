"""The training losses (``--loss``), each a :data:`~torchspec_ext.drafts.base.LossFunction` made once
for the run from the chosen kernels (``torchspec_ext.ops``, or ``torchspec_ext.reference`` with
``--reference-ops``)."""

from __future__ import annotations

import torch

from torchspec_ext.drafts.base import LossFunction

LOSSES = ("topk_kl", "hard_ce", "lk-alpha", "lk-lambda")


class RunLoss:
    """The run's :data:`~torchspec_ext.drafts.base.LossFunction`, with the fused op it calls (``op``)
    for objectives that need the op's other modes (DSpark's L1 term: ``lk_lambda`` at a fixed KL weight)."""

    def __init__(self, fn: LossFunction, op):
        self.fn, self.op = fn, op

    def __call__(self, hidden, weight, ids, logprobs):
        return self.fn(hidden, weight, ids, logprobs)


def loss_function(name: str, kernels) -> RunLoss:
    """``topk_kl``: the draft's cross-entropy to the teacher's top-k distribution; ``hard_ce``: to the
    teacher's argmax alone (a one-hot target); ``lk-alpha`` and ``lk-lambda``: the LK losses of the
    expected acceptance over the teacher's top-k and its tail (arXiv 2602.23881; docs/ops.md), with
    SpecForge's ``kl_scale`` and ``kl_decay``."""
    fused = kernels.draft_topk_kl
    if name == "topk_kl":
        return RunLoss(fused, fused)
    if name == "hard_ce":
        return RunLoss(
            lambda hidden, weight, ids, logprobs: fused(hidden, weight, ids[:, :1], torch.zeros_like(logprobs[:, :1])),
            fused,
        )
    if name in ("lk-alpha", "lk-lambda"):
        kind = name.replace("-", "_")
        return RunLoss(lambda hidden, weight, ids, logprobs: fused(hidden, weight, ids, logprobs, loss=kind), fused)
    raise ValueError(f"no loss {name!r}: give one of {', '.join(LOSSES)}")


def kernels(reference_ops: bool):
    """The module the run's fused kernels come from: ours, or their plain-PyTorch references."""
    from torchspec_ext import ops, reference

    return reference if reference_ops else ops
