"""The teacher side of training: the target model turns token batches into draft-training batches
(:class:`TeacherBatch`), which the pipeline carries and ``--cache-teacher`` stores."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from torchspec_ext import sharding
from torchspec_ext.data import pad_rows


class BatchError(ValueError):
    """A teacher batch whose tensors do not fit together (the message names the tensor)."""


@dataclass
class TeacherBatch:
    """One batch of ``B`` rows of ``T`` positions, as the teacher made it.

    - ``input_ids [B, T]`` int64 and ``loss_mask [B, T]`` bool (the reply tokens to learn);
    - ``features [B, T, F]`` floating: the target's hidden states of the draft's feature layers;
    - ``teacher_indices [B, T, k]`` int64: the teacher's top-k next tokens at each position, as ids
      of the draft vocabulary (-1 where a token is not in it), and ``teacher_logprobs [B, T, k]``
      float32 their log-probabilities (from ``linear_topk_logprobs`` on the LM head, so the
      ``[B*T, V]`` logits never exist). ``k`` is 0 where the draft's loss reads only the data's
      tokens (a teacher of ``topk`` 0 does not run the LM head);
    - ``teacher_argmax [B, T]`` int64: the teacher's top-1 token id in the target vocabulary, -1
      where it did not run the LM head;
    - ``batch_index``: the batch's position in the data stream (named by the NaN guard).
    """

    input_ids: Tensor
    loss_mask: Tensor
    features: Tensor
    teacher_indices: Tensor
    teacher_logprobs: Tensor
    teacher_argmax: Tensor
    batch_index: int

    def tensors(self) -> dict[str, Tensor]:
        """The batch as named tensors (what a channel sends and a cache shard holds)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "batch_index"}
        return out | {"batch_index": torch.tensor([self.batch_index], dtype=torch.long)}

    @staticmethod
    def from_tensors(tensors: dict[str, Tensor], where: str) -> TeacherBatch:
        """The batch of :meth:`tensors`' dict, checked (a BatchError naming ``where`` and the tensor)."""
        names = [f.name for f in fields(TeacherBatch)]
        missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
        if missing or unexpected:
            raise BatchError(f"{where}: not a teacher batch (missing {missing}, unexpected {unexpected})")
        index = tensors["batch_index"]
        if index.numel() != 1 or index.dtype != torch.long:
            raise BatchError(f"{where}: batch_index must be one int64, got {index.dtype} of shape {list(index.shape)}")
        batch = TeacherBatch(**{n: tensors[n] for n in names if n != "batch_index"}, batch_index=int(index))
        return batch.checked(where)

    def checked(self, where: str) -> TeacherBatch:
        """``self``, after checking that the tensors' dtypes and shapes fit together."""
        ids = self.input_ids
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise BatchError(f"{where}: input_ids must be [B, T] int64, got {ids.dtype} {list(ids.shape)}")
        b, t = ids.shape
        k = self.teacher_indices.shape[-1] if self.teacher_indices.dim() == 3 else -1
        expected = {
            "loss_mask": (torch.bool, [b, t]),
            "teacher_indices": (torch.long, [b, t, k]),
            "teacher_logprobs": (torch.float32, [b, t, k]),
            "teacher_argmax": (torch.long, [b, t]),
        }
        for name, (dtype, shape) in expected.items():
            x = getattr(self, name)
            if x.dtype != dtype or list(x.shape) != shape or k < 0:
                raise BatchError(
                    f"{where}: {name} must be {str(dtype).removeprefix('torch.')} {shape} (B, T from input_ids, "
                    f"k from teacher_indices), got {str(x.dtype).removeprefix('torch.')} {list(x.shape)}"
                )
        f = self.features
        if f.dim() != 3 or list(f.shape[:2]) != [b, t] or not f.is_floating_point():
            raise BatchError(f"{where}: features must be floating [{b}, {t}, F], got {f.dtype} {list(f.shape)}")
        return self

    def to(self, device) -> TeacherBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "batch_index"}
        return TeacherBatch(**{k: v.to(device) for k, v in moved.items()}, batch_index=self.batch_index)


class Teacher:
    """Runs the target on ``[B, T]`` token batches and makes draft-training batches."""

    def __init__(self, target, feature_layers, target_to_draft: Tensor, topk: int, kernels=None):
        """``topk``: the log-probabilities kept per position; 0 for a draft whose loss reads only the
        data's tokens, which skips the LM head (a fifth of a small target's forward) and the top-k.
        ``kernels``: where ``linear_topk_logprobs`` and ``topk_logprobs`` come from (the module
        ``torchspec_ext.ops``, the default, or ``torchspec_ext.reference``)."""
        from torchspec_ext import ops

        self.target = target.eval()
        self.layers = list(feature_layers)
        self.device = next(target.parameters()).device
        self.target_to_draft = target_to_draft.to(self.device)
        self.topk = topk
        kernels = kernels or ops
        self.linear_topk, self.topk_logprobs = kernels.linear_topk_logprobs, kernels.topk_logprobs
        self.sharded = sharding.is_sharded(target)  # over a group of teacher ranks (torchspec_ext.sharding)
        num_layers = target.config.num_hidden_layers
        if any(not 0 <= i <= num_layers for i in self.layers):
            raise ValueError(f"feature layers {self.layers} out of range for a target of {num_layers} layers")

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, loss_mask: Tensor, batch_index: int) -> TeacherBatch:
        input_ids = input_ids.to(self.device)
        if self.sharded:
            hidden, final = sharding.hidden_states(self.target.model, input_ids)
        else:
            out = self.target.model(input_ids, output_hidden_states=True)
            hidden, final = out.hidden_states, out.last_hidden_state
        features = torch.cat([hidden[i] for i in self.layers], -1)
        b, t, h = final.shape
        if self.topk == 0:
            none = torch.empty(b, t, 0, dtype=torch.long, device=self.device)
            logprobs, indices, argmax = none.float(), none, torch.full((b, t), -1, device=self.device)
        else:
            with sharding.gathered_weight(self.target.get_output_embeddings()) as head:
                logprobs, indices, _ = self.linear_topk(final.reshape(b * t, h), head, self.topk)
            logprobs, indices, argmax = logprobs.float().view(b, t, -1), indices.view(b, t, -1), indices[:, 0]
        return TeacherBatch(
            input_ids=input_ids,
            loss_mask=loss_mask.to(self.device),
            features=features,
            teacher_indices=self.target_to_draft[indices],
            teacher_logprobs=logprobs,
            teacher_argmax=argmax.view(b, t),
            batch_index=batch_index,
        )

    @torch.no_grad()
    def generate(
        self, groups: list[list[list[int]]], max_new_tokens: int, batch_indices: list[int], pad_id: int, eos_ids
    ) -> list[TeacherBatch]:
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

        def keep_topk(input_ids, scores):  # the argmax too when topk is 0: the logits are there anyway
            topk.append(self.topk_logprobs(scores, max(1, self.topk))[:2])
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
            decoded = (sequences, features, logprobs, indices, width)
            batches.append(self._reply_batch(rows[first : first + len(group)], decoded, batch_index, pad_id))
            first += len(group)
        return batches

    def _reply_batch(self, chosen, decoded, batch_index: int, pad_id: int) -> TeacherBatch:
        """The batch of the decoded rows ``chosen`` ((row, its left padding, its length) each), as
        wide as the longest, right-padded."""
        sequences, features, logprobs, indices, width = decoded
        length = max(n for _, _, n in chosen)
        rows_of = lambda fill, *shape, dtype=torch.long: torch.full(
            (len(chosen), length, *shape), fill, dtype=dtype, device=self.device
        )
        batch = TeacherBatch(
            input_ids=rows_of(pad_id),
            loss_mask=rows_of(False, dtype=torch.bool),
            features=features.new_zeros(len(chosen), length, features.shape[-1]),
            teacher_indices=rows_of(-1, self.topk),
            teacher_logprobs=rows_of(0.0, self.topk, dtype=torch.float32),
            teacher_argmax=rows_of(-1),
            batch_index=batch_index,
        )
        for i, (row, pad, n) in enumerate(chosen):
            last_prompt = width - 1 - pad
            batch.input_ids[i, :n] = sequences[row, pad : pad + n]
            batch.loss_mask[i, last_prompt + 1 : n] = True
            batch.features[i, :n] = features[row, pad : pad + n]
            # The teacher's rows exist from the last prompt token on (the earlier ones predict
            # prompt tokens, which no loss reads); the others keep -1 and 0.
            kept = slice(0, self.topk)
            batch.teacher_indices[i, last_prompt:n] = self.target_to_draft[indices[row, : n - last_prompt, kept]]
            batch.teacher_logprobs[i, last_prompt:n] = logprobs[row, : n - last_prompt, kept]
            batch.teacher_argmax[i, last_prompt:n] = indices[row, : n - last_prompt, 0]
        return batch
