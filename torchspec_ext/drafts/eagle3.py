"""The EAGLE-3 draft model: fused target features, one decoder layer, a reduced vocabulary.

At sequence index ``t`` the draft takes the target's hidden states of token ``t`` from three
layers (low, middle, high), fuses them with ``fc`` into one vector, and with the embedding of
token ``t+1`` (at rotary position ``t+1``) predicts token ``t+2``. Its own output hidden state
then stands in for the target's features at the next step (training-time test): at step ``s``
the query at index ``t`` attends to the step-0 keys of indices ``<= t`` and to the keys of
steps ``1..s`` at index ``t`` only -- exactly what a draft tree's node sees at inference (the
context, then its own ancestors).

Weight names and config fields are those of EAGLE-3 checkpoints as SGLang and vLLM load them
(``fc``, ``midlayer.*``, ``norm``, ``lm_head``, ``d2t``, ``t2d``; architecture
``LlamaForCausalLMEagle3``); ``embed_tokens`` is the target's and stays frozen. The draft's
vocabulary is the ``--draft-vocab`` target tokens most frequent in the training replies.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from torchspec_ext.drafts.base import (
    WEIGHTS_NAME,
    DraftFamily,
    DraftLoadError,
    LossFunction,
    Objective,
    load_weights,
    save_weights,
)
from torchspec_ext.drafts.layers import MLP, RMSNorm, attention_shape, rotate
from torchspec_ext.options import at_least, option
from torchspec_ext.speculate import TreeProposer, TreeSpec

ARCHITECTURE = "LlamaForCausalLMEagle3"


@dataclass(frozen=True)
class Eagle3Options:
    """EAGLE-3's training options."""

    ttt_steps: int | None = option(
        None, "training-time-test unroll steps (default: 3 on CPU, 7 on GPU)", check=at_least(1)
    )
    draft_vocab: int = option(8192, "draft vocabulary: the most frequent target tokens", check=at_least(1))
    vocab_sample: int = option(500, "training conversations counted to choose the draft vocabulary", check=at_least(1))

    def resolved(self, on_gpu: bool) -> Eagle3Options:
        return self if self.ttt_steps else Eagle3Options(7 if on_gpu else 3, self.draft_vocab, self.vocab_sample)


def default_feature_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low / middle / high layers; layer id ``i`` is the input of decoder layer ``i``
    (Hugging Face ``hidden_states[i]``), as vLLM and SGLang count them."""
    return [2, num_layers // 2, num_layers - 3] if num_layers >= 6 else [1, max(1, num_layers // 2), num_layers]


@dataclass
class DraftConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    feature_layers: list[int] = field(default_factory=list)  # target layers fused by fc
    target_num_layers: int = 0

    @staticmethod
    def from_target(config, draft_vocab_size: int) -> DraftConfig:
        """The draft shaped like one layer of the target (a Hugging Face Llama-like config)."""
        return DraftConfig(
            **attention_shape(config),
            draft_vocab_size=min(draft_vocab_size, config.vocab_size),
            feature_layers=default_feature_layers(config.num_hidden_layers),
            target_num_layers=config.num_hidden_layers,
        )

    def to_hf(self, dtype: str = "float32", private: bool = True) -> dict:
        """The config.json of an EAGLE-3 checkpoint, as SGLang and vLLM read it.

        The two count the target's aux layers differently: vLLM reads the top-level
        ``eagle_aux_hidden_state_layer_ids`` as the *input* of decoder layer ``i`` (our
        ``feature_layers``, Hugging Face ``hidden_states[i]``); SGLang reads
        ``eagle_config.eagle_aux_hidden_state_layer_ids`` as the *output* of layer ``i`` and adds
        one, so it gets ``feature_layers - 1``. ``private`` adds this package's own copy of the
        config (``torchspec_ext``), which both loaders ignore."""
        config = {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "target_hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "norm_before_residual": False,
            "torch_dtype": dtype,
            "eagle_aux_hidden_state_layer_ids": list(self.feature_layers),
            "eagle_config": {
                "eagle_aux_hidden_state_layer_ids": [i - 1 for i in self.feature_layers],
                "use_aux_hidden_state": True,
            },
        }
        if private:
            config["torchspec_ext"] = asdict(self)
        return config

    @staticmethod
    def from_hf(config: dict) -> DraftConfig:
        if "torchspec_ext" in config:
            return DraftConfig(**config["torchspec_ext"])
        layers = config.get("eagle_aux_hidden_state_layer_ids")  # vLLM's count: ours
        if not layers:  # SGLang's count: the output of layer i, our i + 1
            sglang = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or []
            layers = [i + 1 for i in sglang]
        rope = config.get("rope_parameters") or {}
        return DraftConfig(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            vocab_size=config["vocab_size"],
            draft_vocab_size=config.get("draft_vocab_size") or config["vocab_size"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            feature_layers=list(layers),
        )


class Attention(nn.Module):
    def __init__(self, c: DraftConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(2 * c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, heads, T, D] and k, v [B, heads, T, D] (KV heads repeated), rotated at ``positions [B, T]``."""
        c = self.c
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = rotate(q, positions[:, None], c.rope_theta), rotate(k, positions[:, None], c.rope_theta)
        groups = c.num_attention_heads // c.num_key_value_heads
        return q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)

    def attend(
        self, q: Tensor, k0: Tensor, v0: Tensor, mask0: Tensor | None, own_k: list[Tensor], own_v: list[Tensor]
    ) -> Tensor:
        """Softmax attention of ``q [B, h, T, D]`` over the step-0 keys ``k0 [B, h, S, D]`` (where
        ``mask0`` allows; None: all) and, per query, over its own keys of later steps
        (``own_k[j] [B, h, T, D]``: the key at the query's own index)."""
        scale = 1.0 / math.sqrt(self.c.head_dim)
        scores = (q @ k0.transpose(-1, -2)) * scale
        if mask0 is not None:
            scores = scores.masked_fill(~mask0, float("-inf"))
        if own_k:
            own = torch.stack([(q * k).sum(-1) for k in own_k], -1) * scale  # [B, h, T, s]
            weights = torch.softmax(torch.cat([scores, own], -1).float(), -1).to(q.dtype)
            out = weights[..., : k0.shape[-2]] @ v0
            for j, v in enumerate(own_v):
                out = out + weights[..., k0.shape[-2] + j, None] * v
        else:
            out = torch.softmax(scores.float(), -1).to(q.dtype) @ v0
        b, h, t, d = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * d))


class MidLayer(nn.Module):
    """EAGLE-3's decoder layer: attention over [normed embedding, normed hidden], then an MLP."""

    def __init__(self, c: DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)

    def attention_input(self, hidden: Tensor, embeds: Tensor) -> Tensor:
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], -1)

    def finish(self, hidden: Tensor, attn_out: Tensor) -> Tensor:
        hidden = hidden + attn_out
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Draft(nn.Module):
    def __init__(self, c: DraftConfig):
        super().__init__()
        self.config = c
        self.metadata: dict = {}  # how it was trained (drafts.base.training_metadata), saved in config.json
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)  # the target's, frozen
        self.fc = nn.Linear(len(c.feature_layers) * c.hidden_size, c.hidden_size, bias=False)
        self.midlayer = MidLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        # d2t[i]: target id of draft id i minus i (EAGLE-3's convention); t2d: target ids kept.
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))
        for module in (
            self.fc,
            self.midlayer.self_attn.q_proj,
            self.midlayer.self_attn.k_proj,
            self.midlayer.self_attn.v_proj,
            self.midlayer.self_attn.o_proj,
            self.midlayer.mlp.gate_proj,
            self.midlayer.mlp.up_proj,
            self.midlayer.mlp.down_proj,
        ):
            nn.init.normal_(module.weight, std=0.02)

    # --- vocabulary maps -------------------------------------------------------------------
    def set_vocab(self, draft_to_target: Tensor) -> None:
        """Sets d2t / t2d from the target ids of the draft vocabulary (``[draft_vocab_size]``)."""
        ids = draft_to_target.to(self.d2t.device, torch.long)
        self.d2t.copy_(ids - torch.arange(len(ids), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    def draft_to_target(self) -> Tensor:
        return self.d2t + torch.arange(len(self.d2t), device=self.d2t.device)

    def target_to_draft(self) -> Tensor:
        """``[vocab_size]`` int64: the draft id of each target id, -1 where it has none."""
        index = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=self.d2t.device)
        index[self.draft_to_target()] = torch.arange(len(self.d2t), device=self.d2t.device)
        return index

    @torch.no_grad()
    def init_from_target(self, target) -> None:
        """Embeddings and the LM head rows of the draft vocabulary from the target; ``fc`` starts
        as the identity on the highest feature layer, so the residual stream starts at the
        target's own high-layer state rather than a random vector (whose logits, through the
        target's LM head, are confidently wrong). Measured on the default target: held-out
        step-0 accuracy after 40 CPU steps 0.15, against 0.10 with a random ``fc`` and the
        target's final norm."""
        self.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
        self.lm_head.weight.copy_(target.get_output_embeddings().weight[self.draft_to_target()])
        h = self.config.hidden_size
        self.fc.weight.zero_()
        self.fc.weight[:, -h:].copy_(torch.eye(h))

    # --- the layer -----------------------------------------------------------------------
    def fuse(self, features: Tensor) -> Tensor:
        """``[B, T, n_layers * H]`` target features -> ``[B, T, H]``."""
        return self.fc(features)

    @property
    def feature_layers(self) -> list[int]:
        return list(self.config.feature_layers)

    def forward(self, batch, loss: LossFunction, options: Eagle3Options) -> Objective:
        """The training objective on a teacher batch: the draft unrolled ``options.ttt_steps`` steps on
        its own hidden states, each step's ``loss`` against the teacher's top-k, and the mean."""
        steps = options.ttt_steps
        ids, mask, features = batch.input_ids, batch.loss_mask, batch.features
        b, t = ids.shape
        k = batch.teacher_indices.shape[-1]
        # Step s at index t predicts token t + 2 + s (teacher row t + 1 + s): pad the time axis by
        # `steps` so every step reads a [B, T] window; padded rows never count.
        pad = lambda x, value: torch.cat([x, x.new_full((b, steps + 1) + tuple(x.shape[2:]), value)], 1)
        ids_ext, mask_ext = pad(ids, 0), pad(mask, False)
        t_idx, t_lp, t_arg = (
            pad(batch.teacher_indices, -1),
            pad(batch.teacher_logprobs, 0.0),
            pad(batch.teacher_argmax, -1),
        )
        hiddens = self.unroll(features.to(self.fc.weight.dtype), ids_ext, steps)
        draft_ids = self.draft_to_target()
        losses, accuracies, tokens = [], [], 0
        for s, hidden in enumerate(hiddens):
            rows = mask_ext[:, 2 + s : 2 + s + t].reshape(-1).nonzero().squeeze(1)
            idx = t_idx[:, 1 + s : 1 + s + t].reshape(-1, k).index_select(0, rows)
            lp = t_lp[:, 1 + s : 1 + s + t].reshape(-1, k).index_select(0, rows)
            h = hidden.reshape(b * t, -1).index_select(0, rows)
            value, argmax, _ = loss(h, self.lm_head.weight, idx, lp)
            want = t_arg[:, 1 + s : 1 + s + t].reshape(-1).index_select(0, rows)
            accuracies.append((draft_ids[argmax] == want).float().mean().item() if len(rows) else 0.0)
            losses.append(value)
            if s == 0:
                tokens = len(rows)
        return Objective(torch.stack(losses).mean(), losses, accuracies, tokens)

    def unroll(self, features: Tensor, input_ids: Tensor, steps: int) -> list[Tensor]:
        """Training-time test: the draft's normed output hidden states ``[B, T, H]`` for steps
        ``0..steps-1``. ``features [B, T, n*H]`` of tokens ``0..T-1``; ``input_ids [B, T + steps]``:
        step ``s`` at index ``t`` embeds ``input_ids[:, t + 1 + s]`` at position ``t + 1 + s``
        (ids past the end of a sequence can be anything: their rows are masked out of the loss)."""
        b, t, _ = features.shape
        layer, attn = self.midlayer, self.midlayer.self_attn
        hidden = self.fuse(features)
        index = torch.arange(t, device=features.device)
        causal = index[None, :] <= index[:, None]  # [T(query), T(key)]
        k0 = v0 = None
        own_k, own_v, outputs = [], [], []
        for s in range(steps):
            embeds = self.embed_tokens(input_ids[:, 1 + s : 1 + s + t])
            positions = (index + 1 + s).expand(b, t)
            q, k, v = attn.qkv(layer.attention_input(hidden, embeds), positions)
            if s == 0:
                k0, v0 = k, v
                out = attn.attend(q, k0, v0, causal, [], [])
            else:
                own_k.append(k)
                own_v.append(v)
                out = attn.attend(q, k0, v0, causal, own_k, own_v)
            hidden = layer.finish(hidden, out)
            outputs.append(self.norm(hidden))
        return outputs

    # --- checkpoints ---------------------------------------------------------------------
    def trained_state(self) -> dict[str, Tensor]:
        """The EAGLE-3 checkpoint's tensors (the frozen target embedding excluded)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("embed_tokens.")}

    def save(self, directory: str | Path, dtype: torch.dtype | None = None, private: bool = True) -> None:
        """config.json and model.safetensors; floating-point tensors cast to ``dtype`` if given
        (``d2t`` stays int64 and ``t2d`` bool)."""
        dtype_name = str(dtype or self.fc.weight.dtype).removeprefix("torch.")
        config = self.config.to_hf(dtype_name, private) | ({"training": self.metadata} if self.metadata else {})
        save_weights(Path(directory), self.trained_state(), config, dtype)

    @staticmethod
    def load(directory: str | Path, target=None) -> Eagle3Draft:
        """A saved or exported draft; embeddings from ``target`` (or from the file, if it has them).

        Without either, ``embed_tokens`` stays zero: enough to read or re-export the trained
        weights, not to draft."""
        from safetensors.torch import load_file

        from torchspec_ext.drafts import read_family_config

        directory = Path(directory)
        raw, config = read_family_config(directory, Eagle3Family, DraftConfig.from_hf)
        if not config.feature_layers:
            if target is None:
                raise DraftLoadError(f"{directory}: config names no feature layers and no target was given")
            config.feature_layers = default_feature_layers(target.config.num_hidden_layers)
            print(
                f"warning: {directory}: its config names no feature layers (eagle_aux_hidden_state_layer_ids); "
                f"assuming EAGLE-3's default for a {target.config.num_hidden_layers}-layer target, "
                f"{config.feature_layers}: a draft trained on other layers will accept little",
                file=sys.stderr,
            )
        draft = Eagle3Draft(config)
        state = load_file(str(directory / WEIGHTS_NAME))
        if target is not None:
            state["embed_tokens.weight"] = target.get_input_embeddings().weight.detach().float().cpu()
        elif "embed_tokens.weight" not in state:
            draft.embed_tokens.weight.data.zero_()
        load_weights(draft, directory, state, ["embed_tokens.weight"], "EAGLE-3")
        draft.set_vocab(draft.draft_to_target())  # t2d rebuilt from d2t, so the two always agree
        draft.metadata = raw.get("training") or {}
        return draft


class Eagle3Drafter:
    """An :class:`Eagle3Draft` behind the decoder's ``Draft`` interface.

    ``speculative_generate`` hands it the target's features of every committed token
    (``reset`` after the prefill, ``observe`` after each verification). The step-0 keys and
    values of the context live in buffers that grow by doubling, so each round computes only
    the newly committed tokens; within a round each tree node's hidden state and keys are kept
    by path, and all the new nodes of one call (a tree level) go through the layer together.
    """

    def __init__(self, draft: Eagle3Draft):
        self.draft = draft.eval()
        self.feature_layers = list(draft.config.feature_layers)
        self.device = draft.fc.weight.device
        self.dtype = draft.fc.weight.dtype
        self._draft_ids = draft.draft_to_target()
        self.reset(torch.empty(0, draft.fc.in_features, device=self.device))

    def reset(self, features: Tensor) -> None:
        """Start a new sequence whose first ``len(features)`` tokens the target has seen."""
        c = self.draft.config
        self.pending = features.to(self.device, self.dtype)  # features of tokens not yet in the buffers
        self.length = 0  # context tokens whose step-0 keys are in the buffers
        self.k0 = torch.empty(1, c.num_attention_heads, 64, c.head_dim, device=self.device, dtype=self.dtype)
        self.v0 = torch.empty_like(self.k0)
        self.last_hidden = None
        self.nodes: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}  # path -> hidden [H], keys, values [h, levels, D]
        self.nodes_context = -1

    def observe(self, features: Tensor) -> None:
        """The target's features of newly committed tokens, in order."""
        self.pending = torch.cat([self.pending, features.to(self.pending)])

    def _grow(self, need: int) -> None:
        if need > self.k0.shape[-2]:
            size = max(need, 2 * self.k0.shape[-2])
            k0 = self.k0.new_empty(self.k0.shape[:2] + (size, self.k0.shape[-1]))
            v0 = torch.empty_like(k0)
            k0[:, :, : self.length], v0[:, :, : self.length] = (
                self.k0[:, :, : self.length],
                self.v0[:, :, : self.length],
            )
            self.k0, self.v0 = k0, v0

    @torch.no_grad()
    def _extend_context(self, context) -> None:
        d, attn = self.draft, self.draft.midlayer.self_attn
        n, done = len(context), self.length
        if done + self.pending.shape[0] != n - 1:
            raise RuntimeError(
                f"Eagle3Drafter: {done + self.pending.shape[0]} feature rows for a context of {n} "
                f"tokens ({n - 1} expected); speculative_generate feeds them"
            )
        if done == n - 1:
            return
        index = torch.arange(done, n - 1, device=self.device)
        hidden = d.fuse(self.pending[None])
        embeds = d.embed_tokens(torch.tensor(context[done + 1 :], device=self.device)[None])
        q, k, v = attn.qkv(d.midlayer.attention_input(hidden, embeds), (index + 1)[None])
        self._grow(n - 1)
        self.k0[:, :, done : n - 1], self.v0[:, :, done : n - 1] = k, v
        self.length, self.pending = n - 1, self.pending[:0]
        causal = torch.arange(n - 1, device=self.device)[None, :] <= index[:, None]
        out = attn.attend(q, self.k0[:, :, : n - 1], self.v0[:, :, : n - 1], causal, [], [])
        self.last_hidden = d.midlayer.finish(hidden, out)[0, -1]

    def _add_nodes(self, context_len: int, paths: list[tuple]) -> None:
        """Hidden states and keys of ``paths`` (all of one length, their parents known), in one pass:
        the nodes are the queries of one sequence, sharing the context's keys."""
        d, attn = self.draft, self.draft.midlayer.self_attn
        parents = [self.nodes[p[:-1]] for p in paths]
        hidden = torch.stack([p[0] for p in parents])[None]  # [1, n, H]
        embeds = d.embed_tokens(torch.tensor([[p[-1] for p in paths]], device=self.device))
        position = torch.full((1, len(paths)), context_len - 1 + len(paths[0]), device=self.device)
        q, k, v = attn.qkv(d.midlayer.attention_input(hidden, embeds), position)  # [1, h, n, D]
        # Each node's own keys: its ancestors' (one per level), then its own; [1, h, n, D] per level.
        own_k = [x[None] for x in torch.stack([p[1] for p in parents], 2).unbind(1)] + [k]
        own_v = [x[None] for x in torch.stack([p[2] for p in parents], 2).unbind(1)] + [v]
        out = attn.attend(q, self.k0[:, :, : self.length], self.v0[:, :, : self.length], None, own_k, own_v)
        hidden = d.midlayer.finish(hidden, out)[0]
        keys, values = torch.stack(own_k, 3)[0], torch.stack(own_v, 3)[0]  # [h, n, levels, D]
        for i, path in enumerate(paths):
            self.nodes[path] = (hidden[i], keys[:, i], values[:, i])

    @torch.no_grad()
    def next_logprobs(self, context, paths) -> Tensor:
        self._extend_context(context)
        if self.nodes_context != len(context):
            c = self.draft.config
            none = torch.empty(
                c.num_attention_heads, 0, c.head_dim, device=self.device, dtype=self.dtype
            )  # [h, levels, D]
            self.nodes, self.nodes_context = {(): (self.last_hidden, none, none)}, len(context)
        paths = [tuple(p) for p in paths]
        missing = {p[:i] for p in paths for i in range(1, len(p) + 1)} - self.nodes.keys()
        for length in sorted({len(p) for p in missing}):  # ancestors first: one pass per tree level
            self._add_nodes(len(context), sorted(p for p in missing if len(p) == length))
        hidden = torch.stack([self.nodes[p][0] for p in paths])  # [P, H]
        logprobs = torch.log_softmax(self.draft.lm_head(self.draft.norm(hidden)).float(), -1)
        out = torch.full((len(paths), self.draft.config.vocab_size), float("-inf"), device=self.device)
        out[:, self._draft_ids] = logprobs
        return out


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


class Eagle3Family(DraftFamily):
    name = "eagle3"
    title = "EAGLE-3"
    architectures = (ARCHITECTURE,)
    Options = Eagle3Options

    def new_draft(self, target, token_sample: Sequence[tuple[Tensor, Tensor]], options: Eagle3Options) -> Eagle3Draft:
        """A draft whose vocabulary is the ``options.draft_vocab`` target tokens most frequent in
        ``token_sample``'s replies, initialised from the target."""
        if options.draft_vocab > target.config.vocab_size:
            raise ValueError(
                f"--draft-vocab {options.draft_vocab} is larger than the target's vocabulary: give 1 to "
                f"{target.config.vocab_size}"
            )
        vocab_size = target.config.vocab_size
        vocab = build_draft_vocab(
            [i for i, _ in token_sample], [m for _, m in token_sample], options.draft_vocab, vocab_size
        )
        draft = Eagle3Draft(DraftConfig.from_target(target.config, options.draft_vocab))
        draft.set_vocab(vocab)
        draft.init_from_target(target)
        return draft

    def config_from(self, config: dict) -> DraftConfig:
        return DraftConfig.from_hf(config)

    def load(self, directory: Path, target=None) -> Eagle3Draft:
        return Eagle3Draft.load(directory, target)

    def proposer(self, draft: Eagle3Draft, spec: TreeSpec) -> TreeProposer:
        return TreeProposer(Eagle3Drafter(draft), spec)

    def export_problems(self, draft: Eagle3Draft) -> tuple[list[str], list[str]]:
        c, errors, warnings = draft.config, [], []
        if len(c.feature_layers) != 3:
            errors.append(
                f"the draft fuses {len(c.feature_layers)} target layers; SGLang and vLLM's EAGLE-3 fuse exactly 3"
            )
        ids = draft.draft_to_target()
        if ids.min() < 0 or ids.max() >= c.vocab_size or len(ids.unique()) != len(ids):
            errors.append("d2t does not map the draft vocabulary onto distinct target ids")
        odd = [i for i in c.feature_layers if i < 1 or (c.target_num_layers and i >= c.target_num_layers)]
        if odd:
            warnings.append(
                f"feature layers {odd} are the target's embeddings or its final (normed) hidden state; SGLang and "
                "vLLM capture the inputs of decoder layers 1..L-1 only, so they will not feed this draft what it "
                "was trained on"
            )
        return errors, warnings
