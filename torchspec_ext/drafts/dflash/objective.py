"""The DFlash and DSpark training objectives: random anchors in the replies, one block per anchor, the
loss of every supervised slot weighted by its place in the block (DFlash: decayed cross-entropy,
D-PACE, or the run's loss against the teacher's top-k; DSpark: 0.1 CE + 0.9 L1 through the fused op,
or the run's loss, plus the confidence head's BCE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from torchspec_ext.drafts.base import LossFunction, Objective
from torchspec_ext.drafts.dflash.loss_parts import (
    ScaleRowGrad,
    dpace_weights,
    scaled,
    topk_acceptance,
    topk_cross_entropy,
    topk_logits,
    weighted_loss,
)

# DSpark's published loss: 0.1 cross-entropy + 0.9 L1 distance to the teacher + the confidence BCE.
DSPARK_CE, DSPARK_L1 = 0.1, 0.9


@dataclass
class Blocks:
    """A batch's sampled blocks: ``anchors [b, N]`` (0 where ``keep`` is False), ``keep [b, N]``."""

    anchors: Tensor
    keep: Tensor


def sample_blocks(loss_mask: Tensor, count: int) -> Blocks:
    """Up to ``count`` anchors per row, at random among the positions ``a`` whose token and next
    token are both in the loss mask (as SpecForge and speculators sample them); torch's random
    generator, so each pass over a replayed batch draws new ones and a resumed run the same."""
    b, t = loss_mask.shape
    valid = loss_mask[:, :-1] & loss_mask[:, 1:]
    counts = valid.sum(1)
    n = max(1, min(count, int(counts.max()) if t > 1 else 0))
    if t < 2 or int(counts.max()) == 0:
        zeros = torch.zeros(b, n, dtype=torch.long, device=loss_mask.device)
        return Blocks(zeros, zeros.bool())
    noise = torch.rand(valid.shape, device=loss_mask.device).masked_fill(~valid, 2.0)
    chosen = noise.argsort(1)[:, :n]
    keep = torch.arange(n, device=loss_mask.device)[None] < counts.clamp(max=n)[:, None]
    anchors = torch.where(keep, chosen, 0)
    return Blocks(anchors, keep)


def supervised_rows(config, blocks: Blocks, loss_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row, block, slot) ``[M]`` each of the supervised predictions of a draft of ``config``: slot ``s``
    (counting the predicting slots from 0) predicts the token at ``anchor + s + 1``, supervised where it
    is inside the row and in the loss mask; DSpark's only while every earlier slot of its block is
    (SpecForge trains it so), DFlash's whatever the others."""
    t = loss_mask.shape[1]
    position = blocks.anchors[..., None] + torch.arange(1, config.proposals + 1, device=loss_mask.device)
    ok = blocks.keep[..., None] & (position < t)
    ok = ok & loss_mask.gather(1, position.clamp(max=t - 1).flatten(1)).view_as(ok)
    if config.sample_from_anchor:
        ok = ok.int().cumprod(-1).bool()
    return ok.nonzero(as_tuple=True)


def block_objective(draft, batch, loss: LossFunction, options) -> Objective:
    """``draft``'s (a ``DFlashDraft``) training objective on a teacher batch: ``options.num_anchors``
    random blocks per row, the loss of every supervised slot (``options.block_loss``) weighted by its
    place in the block.

    All the slots' rows go through one call of the loss (one pass over the LM head); each row's
    weight reaches the gradient through its scale (:class:`ScaleRowGrad`). ``Objective.losses``
    are per slot the cross-entropy on the data's tokens, ``accuracies`` the agreement with the
    teacher's argmax (with the data's token where the batch has no teacher top-k); ``total``'s value
    is the weighted loss (with ``teacher``, the run's loss, whose rows this cannot weigh after the
    fact, its plain mean over the rows)."""
    c = draft.config
    ids, mask = batch.input_ids, batch.loss_mask
    blocks = sample_blocks(mask, options.num_anchors)
    block_ids, positions = draft.block_inputs(ids, blocks.anchors)
    hidden = draft.run_blocks(
        draft.context(batch.features.to(draft.fc.weight.dtype)), block_ids, positions,
        draft.attention_masks(blocks.anchors, ids.shape[1]),
    )  # fmt: skip
    rows = supervised_rows(c, blocks, mask)
    b_idx, n_idx, slot = rows
    position = blocks.anchors[b_idx, n_idx] + slot + 1  # the predicted token's
    h = hidden[b_idx, n_idx, slot + (0 if c.sample_from_anchor else 1)]
    token = ids[b_idx, position]
    t_idx, t_lp = batch.teacher_indices[b_idx, position - 1], batch.teacher_logprobs[b_idx, position - 1]
    t_arg = batch.teacher_argmax[b_idx, position - 1]
    if len(slot) == 0:
        zero = hidden.sum() * 0
        return Objective(zero, [zero.detach()] * c.proposals, [0.0] * c.proposals, 0)
    decay = torch.exp(-slot.float() / options.loss_decay_gamma)
    prev_embed = None
    if c.is_dspark:
        previous = ids[b_idx, position - 1]
        argmax, lse, total, prev_embed = dspark_loss(draft, h, previous, t_idx, t_lp, slot, decay, loss, options)
    else:
        shape = blocks.anchors.shape
        argmax, lse, total = dflash_loss(draft, h, token, t_idx, t_lp, rows, shape, decay, loss, options)
    with torch.no_grad():
        ce = lse.float() - (h.float() * draft.lm_head.weight[token].float()).sum(-1)
        if prev_embed is not None:  # the Markov bias of the previous token
            ce = ce - (draft.markov_head.markov_w2.weight[token].float() * prev_embed.float()).sum(-1)
        slots = c.proposals
        per_slot = torch.zeros(slots, device=h.device).index_add_(0, slot, ce)
        seen = torch.bincount(slot, minlength=slots)
        reference = torch.where(t_arg >= 0, t_arg, token)  # the data's token where the teacher ran no LM head
        hits = torch.zeros(slots, device=h.device).index_add_(0, slot, (argmax == reference).float())
    losses = list((per_slot / seen.clamp(min=1)).unbind())
    accuracies = (hits / seen.clamp(min=1)).tolist()
    return Objective(total, losses, accuracies, int(seen[0]))


def dflash_loss(draft, h, token, t_idx, t_lp, rows, blocks_shape, decay, loss, options):
    """DFlash's loss on the rows ``h [M, H]``: (argmax, lse, the objective). The target's LM head is
    frozen, so one call of the loss weighs every row through its scale (:class:`ScaleRowGrad`),
    filled after the call: D-PACE's weights need each row's cross-entropy first."""
    m = len(token)
    head = draft.lm_head.weight
    scale = torch.ones(m, device=h.device)
    h_scaled = ScaleRowGrad.apply(h, scale)
    if options.block_loss == "teacher":
        value, argmax, lse = loss(h_scaled, head, t_idx, t_lp)
    else:  # the data's token as a one-entry teacher: its cross-entropy
        value, argmax, lse = loss(h_scaled, head, token[:, None], h.new_zeros(m, 1))
    with torch.no_grad():
        ce = lse.float() - (h.float() * head[token].float()).sum(-1)
        if options.block_loss == "dpace":
            weights = dpace_weights(ce, rows, blocks_shape, draft.config.proposals, options.dpace_alpha)
            scale.copy_(weights)  # the mean over the rows, each scaled by w: sum_r w_r ce_r / M
            reported = (weights * ce).mean()
        else:
            scale.copy_(decay * m / decay.sum())
            reported = (decay * ce).sum() / decay.sum() if options.block_loss == "ce" else value.detach()
    return argmax, lse, reported + (value - value.detach())


def dspark_loss(draft, h, previous, t_idx, t_lp, slot, decay, loss, options):
    """DSpark's loss on the rows ``h [M, H]`` whose previous tokens are ``previous [M]``: the logits
    with the Markov bias (as ``[h, markov_w1[previous]] @ [lm_head, markov_w2]^T`` in the fused op);
    ``block_loss`` dspark: 0.1 * the cross-entropy to the teacher's top-k + 0.9 * the L1 distance to
    the teacher, ``2 (1 - alpha)`` with ``alpha`` the op's LK estimate of the acceptance over the
    top-k and its tail (SpecForge's ``dspark`` has the target's whole distribution and the data's
    token; we have the teacher's top-k); teacher: the run's ``--loss``. Plus the confidence head's
    binary cross-entropy against ``alpha``. Returns (argmax, lse, the objective, Markov embeddings
    of ``previous`` or None)."""
    markov = draft.markov_head
    prev_embed = markov.markov_w1(previous).to(h.dtype) if markov is not None else None
    h_all = h if prev_embed is None else torch.cat([h, prev_embed], -1)
    weight = draft.lm_head.weight if markov is None else torch.cat([draft.lm_head.weight, markov.markov_w2.weight], -1)
    if options.block_loss == "dspark":
        op = getattr(loss, "op", None)
        if op is None:
            raise TypeError("DSpark's loss needs the run's fused op (training.losses.loss_function gives it)")
        # lk_lambda with a constant KL weight s: s KL + (1 - s)(1 - alpha), scaled to 0.1 KL + 0.9 * 2 (1 - alpha)
        share = DSPARK_CE / (DSPARK_CE + 2 * DSPARK_L1)
        fn = lambda *args: scaled(op(*args, loss="lk_lambda", kl_scale=share, kl_decay=0.0), DSPARK_CE / share)
    else:
        fn = loss
    value, argmax, lse = weighted_loss(fn, h_all, weight, t_idx, t_lp, slot, decay)
    with torch.no_grad():
        logits = topk_logits(h_all, weight, t_idx)
        alpha = topk_acceptance(logits, lse, t_idx, t_lp)
        if options.block_loss == "dspark":
            per_row = DSPARK_CE * topk_cross_entropy(logits, lse, t_idx, t_lp) + 2 * DSPARK_L1 * (1 - alpha)
            reported = (decay * per_row).sum() / decay.sum()
        else:
            reported = value.detach()
    total = reported + (value - value.detach())
    if draft.confidence_head is not None:
        logit = draft.confidence_head.proj(h_all).squeeze(-1).float()
        bce = F.binary_cross_entropy_with_logits(logit, alpha, reduction="none")
        total = total + (decay * bce).sum() / decay.sum()
    return argmax, lse, total, prev_embed
