"""The teacher side of training: the target model turns token batches into draft-training batches.

A batch (``dict[str, Tensor]``, what ``TensorChannel`` carries and ``--cache-teacher`` stores):

- ``input_ids [B, T]`` int64 and ``loss_mask [B, T]`` bool (assistant tokens);
- ``features [B, T, 3H]``: the target's hidden states of the draft's feature layers;
- ``teacher_indices [B, T, k]`` int64: the teacher's top-k next tokens at each position, as ids
  of the draft vocabulary (-1 where a token is not in it), and ``teacher_logprobs [B, T, k]``
  float32 their log-probabilities (from ``linear_topk_logprobs`` on the LM head, so the
  ``[B*T, V]`` logits never exist);
- ``teacher_argmax [B, T]`` int64: the teacher's top-1 token id in the target vocabulary;
- ``batch_index [1]`` int64: the batch's position in the data stream (named by the NaN guard).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from torchspec_ext import ops, reference, sharding
from torchspec_ext.data import pad_rows

BATCH_KEYS = (
    "input_ids",
    "loss_mask",
    "features",
    "teacher_indices",
    "teacher_logprobs",
    "teacher_argmax",
    "batch_index",
)


def build_draft_vocab(token_lists, loss_masks, size: int, vocab_size: int) -> Tensor:
    """The ``size`` target ids most frequent among the loss-masked tokens (ties: lower id), padded
    with the lowest unseen ids; sorted ascending."""
    counts = Counter()
    for ids, mask in zip(token_lists, loss_masks):
        counts.update(ids[mask].tolist())
    chosen = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]
    if len(chosen) < size:
        seen = set(chosen)
        chosen += [t for t in range(vocab_size) if t not in seen][: size - len(chosen)]
    return torch.tensor(sorted(chosen), dtype=torch.long)


class Teacher:
    """Runs the target on ``[B, T]`` token batches and makes draft-training batches."""

    def __init__(self, target, feature_layers, target_to_draft: Tensor, topk: int, reference_ops: bool = False):
        self.target = target.eval()
        self.layers = list(feature_layers)
        self.device = next(target.parameters()).device
        self.target_to_draft = target_to_draft.to(self.device)
        self.topk = topk
        self.linear_topk = reference.linear_topk_logprobs if reference_ops else ops.linear_topk_logprobs
        self.topk_logprobs = reference.topk_logprobs if reference_ops else ops.topk_logprobs
        self.sharded = sharding.is_sharded(target)  # over a group of teacher ranks (torchspec_ext.sharding)
        num_layers = target.config.num_hidden_layers
        if any(not 0 <= i <= num_layers for i in self.layers):
            raise ValueError(f"feature layers {self.layers} out of range for a target of {num_layers} layers")

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, loss_mask: Tensor, batch_index: int) -> dict[str, Tensor]:
        input_ids = input_ids.to(self.device)
        if self.sharded:
            hidden, final = sharding.hidden_states(self.target.model, input_ids)
        else:
            out = self.target.model(input_ids, output_hidden_states=True)
            hidden, final = out.hidden_states, out.last_hidden_state
        features = torch.cat([hidden[i] for i in self.layers], -1)
        b, t, h = final.shape
        with sharding.gathered_weight(self.target.get_output_embeddings()) as head:
            logprobs, indices, _ = self.linear_topk(final.reshape(b * t, h), head, self.topk)
        return {
            "input_ids": input_ids,
            "loss_mask": loss_mask.to(self.device),
            "features": features,
            "teacher_indices": self.target_to_draft[indices].view(b, t, -1),
            "teacher_logprobs": logprobs.float().view(b, t, -1),
            "teacher_argmax": indices[:, 0].view(b, t),
            "batch_index": torch.tensor([batch_index], dtype=torch.long),
        }

    @torch.no_grad()
    def generate(
        self, groups: list[list[list[int]]], max_new_tokens: int, batch_indices: list[int], pad_id: int, eos_ids
    ) -> list[dict[str, Tensor]]:
        """Batches of the target's own greedy replies: one batch per group of prompts, all the
        groups decoded together (one decoding of many rows costs far less per token than one of
        a few). The decoding forwards yield the features at every position and the top-k at
        every position that predicts a reply token, so the teacher costs nothing beyond the
        decoding. The loss mask covers each reply through its first end-of-sequence token; rows
        are right-padded as in :meth:`__call__`, each batch as wide as its longest row."""
        from transformers import LogitsProcessorList

        prompts = [p for group in groups for p in group]
        ids = pad_rows(prompts, pad_id, left=True)  # left padding, as generate() wants
        attention = pad_rows([[1] * len(p) for p in prompts], 0, left=True)
        width = ids.shape[1]
        # Each decoding step's logits are the target's at the last prompt token and at every reply
        # token but the last: their top-k is taken as they pass (keeping [B, steps, V] logits
        # would take gigabytes).
        topk = []

        def keep_topk(input_ids, scores):
            topk.append(self.topk_logprobs(scores, self.topk)[:2])
            return scores

        out = self.target.generate(
            ids.to(self.device),
            attention_mask=attention.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            output_hidden_states=True,
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
            cache_implementation="static",
            logits_processor=LogitsProcessorList([keep_topk]),
        )
        steps = out.hidden_states  # per decoding step: a tuple over layers of [B, new positions, H]
        features = torch.cat([torch.cat([s[i] for s in steps], 1) for i in self.layers], -1)
        t = features.shape[1]  # every position but the last generated token's
        logprobs = torch.stack([lp for lp, _ in topk], 1).float()  # [B, steps, k]: positions width - 1 ..
        indices = torch.stack([i for _, i in topk], 1)
        sequences = out.sequences[:, :t]
        eos = torch.tensor(sorted(eos_ids), device=self.device)
        # Right-align each row at index 0 (drop its left padding) so the draft's causal attention
        # never sees padding; the row ends after its end-of-sequence token.
        rows = []
        for row, p in enumerate(prompts):
            pad = width - len(p)
            reply = sequences[row, width:]
            ended = torch.isin(reply, eos).nonzero()
            reply_len = int(ended[0]) + 1 if len(ended) else len(reply)
            rows.append((row, pad, min(t - pad, len(p) + reply_len)))
        batches, first = [], 0
        for group, batch_index in zip(groups, batch_indices):
            chosen = rows[first : first + len(group)]
            first += len(group)
            length = max(n for _, _, n in chosen)
            batch = {
                "input_ids": torch.full((len(group), length), pad_id, dtype=torch.long, device=self.device),
                "loss_mask": torch.zeros(len(group), length, dtype=torch.bool, device=self.device),
                "features": features.new_zeros(len(group), length, features.shape[-1]),
                "teacher_indices": torch.full(
                    (len(group), length, self.topk), -1, dtype=torch.long, device=self.device
                ),
                "teacher_logprobs": torch.zeros(len(group), length, self.topk, device=self.device),
                "teacher_argmax": torch.full((len(group), length), -1, dtype=torch.long, device=self.device),
                "batch_index": torch.tensor([batch_index], dtype=torch.long),
            }
            for i, (row, pad, n) in enumerate(chosen):
                last_prompt = width - 1 - pad
                batch["input_ids"][i, :n] = sequences[row, pad : pad + n]
                batch["loss_mask"][i, last_prompt + 1 : n] = True
                batch["features"][i, :n] = features[row, pad : pad + n]
                # The teacher's rows exist from the last prompt token on (the earlier ones predict
                # prompt tokens, which no loss reads); the others keep -1 and 0.
                batch["teacher_indices"][i, last_prompt:n] = self.target_to_draft[indices[row, : n - last_prompt]]
                batch["teacher_logprobs"][i, last_prompt:n] = logprobs[row, : n - last_prompt]
                batch["teacher_argmax"][i, last_prompt:n] = indices[row, : n - last_prompt, 0]
            batches.append(batch)
        return batches
