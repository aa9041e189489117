"""The numeric parts of the block objectives: a row's weight applied through its gradient (one call of
the fused loss for every slot of a block), D-PACE's weights, and the per-row estimates of the draft's
acceptance and cross-entropy over the teacher's top-k that DSpark's loss and confidence head use."""

from __future__ import annotations

import torch
from torch import Tensor

from torchspec_ext.drafts.base import LossFunction


class ScaleRowGrad(torch.autograd.Function):
    """Identity whose backward multiplies row ``n``'s gradient by ``scale[n]``; ``scale`` may be filled
    after the forward (before the backward): D-PACE's weights need every slot's loss first."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale  # not saved for backward: it is written after this forward, on purpose
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale[:, None].to(grad.dtype), None


def scaled(result, factor: float):
    value, argmax, lse = result
    return value * factor, argmax, lse


def weighted_loss(fn: LossFunction, hidden: Tensor, weight: Tensor, ids, logprobs, slot: Tensor, decay: Tensor):
    """``fn`` (a loss that is a mean over rows) weighted per row by ``decay`` (constant within a
    ``slot``): (value, argmax, lse). With a frozen ``weight``, one call, each row's weight reaching
    the gradient through its scale (:class:`ScaleRowGrad`; the value is then the plain mean). With a
    trained one (DSpark's Markov bias), the op's weight gradient is a plain mean over its rows, which
    no scale of the rows reweighs: one call per slot (the value is then the weighted mean)."""
    norm = decay.sum()
    if not weight.requires_grad:
        return fn(ScaleRowGrad.apply(hidden, decay * len(decay) / norm), weight, ids, logprobs)
    argmax = torch.empty(len(slot), dtype=torch.long, device=hidden.device)
    lse = torch.empty(len(slot), device=hidden.device)
    value = hidden.new_zeros((), dtype=torch.float32)
    for s in slot.unique().tolist():
        rows = (slot == s).nonzero().squeeze(1)
        v, best, row_lse = fn(hidden[rows], weight, ids[rows], logprobs[rows])
        value = value + v * (decay[rows].sum() / norm)
        argmax[rows], lse[rows] = best, row_lse.float()
    return value, argmax, lse


@torch.no_grad()
def topk_logits(hidden: Tensor, weight: Tensor, ids: Tensor, chunk: int = 256) -> Tensor:
    """The draft's logits ``[N, k]`` at the teacher's top-k ids (0 where an id is -1), in chunks of rows
    (never the ``[N, V]`` logits, nor more than ``chunk * k`` rows of ``weight`` at once)."""
    out = hidden.new_zeros(ids.shape, dtype=torch.float32)
    for start in range(0, len(ids), chunk):
        i = ids[start : start + chunk]
        rows = weight[i.clamp(min=0)].float()  # [n, k, H]
        out[start : start + chunk] = (rows @ hidden[start : start + chunk].float()[:, :, None]).squeeze(-1)
    return out.masked_fill(ids < 0, 0.0)


@torch.no_grad()
def topk_acceptance(logits: Tensor, lse: Tensor, ids: Tensor, logprobs: Tensor) -> Tensor:
    """Per row, the expected acceptance ``sum_v min(p(v), q(v))`` estimated from the teacher's top-k as
    the fused op's LK losses estimate it (docs/ops.md): the ids present, plus ``min`` of the two
    tails. ``logits [N, k]`` the draft's at the ids (:func:`topk_logits`), ``lse [N]`` its log-sum-exp."""
    present = ids >= 0
    q = torch.where(present, (logits - lse.float()[:, None]).exp(), 0.0)
    p_all = logprobs.float().exp()
    p = torch.where(present, p_all, 0.0)
    # the teacher's tail is the mass outside all k entries (those outside the draft's vocabulary too)
    tails = torch.minimum((1 - p_all.sum(-1)).clamp(min=0), (1 - q.sum(-1)).clamp(min=0))
    return (torch.minimum(p, q).sum(-1) + tails).clamp(0, 1)


@torch.no_grad()
def topk_cross_entropy(logits: Tensor, lse: Tensor, ids: Tensor, logprobs: Tensor) -> Tensor:
    """Per row, the fused op's ``kl`` loss: ``-sum_j p_j log q(id_j)``, ``p`` the softmax of the teacher's
    log-probabilities over the ids present."""
    present = ids >= 0
    p = torch.softmax(logprobs.float().masked_fill(~present, float("-inf")), -1).nan_to_num(0.0)
    return (p * (lse.float()[:, None] - logits)).sum(-1)


@torch.no_grad()
def dpace_weights(ce: Tensor, rows, blocks_shape, slots: int, alpha: float) -> Tensor:
    """D-PACE's weight of each supervised row (arXiv 2605.18810; SpecForge's ``dpace``): slot ``k``'s is
    ``sum_{j >= k, supervised} prod_{i <= j} s_i`` over its block, with ``s_i = (1 - alpha) q_i + alpha``
    for a supervised slot (``q_i = exp(-ce_i)``, the draft's probability of its token) and 1 otherwise.
    ``rows``: (row, block, slot) of each ``ce``; ``blocks_shape``: (rows, blocks)."""
    b_idx, n_idx, slot = rows
    smooth = torch.ones(*blocks_shape, slots, device=ce.device)
    present = torch.zeros_like(smooth, dtype=torch.bool)
    smooth[b_idx, n_idx, slot] = (1 - alpha) * (-ce).exp() + alpha
    present[b_idx, n_idx, slot] = True
    prefix = smooth.cumprod(-1)
    suffix = (prefix * present).flip(-1).cumsum(-1).flip(-1)
    return suffix[b_idx, n_idx, slot]
