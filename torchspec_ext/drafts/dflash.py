"""DFlash (block-parallel drafting) and DSpark (DFlash + a previous-token logit bias + a confidence head).

A DFlash draft is a small stack of Qwen3-style decoder layers (per-head ``q_norm`` / ``k_norm``) run
over a *block* of ``B`` positions: the anchor token (the last committed token, whose target features
do not exist yet), then ``B - 1`` copies of a mask token, at rotary positions ``anchor .. anchor + B
- 1``. Inside the block the attention has no causal mask; every layer also attends to keys and values
projected from the target's features at the positions strictly before the anchor (several target
layers concatenated, ``fc`` then ``hidden_norm``, shared by all layers). The target's embedding and
LM head are the draft's, frozen. Slot ``k`` of the block predicts the token at ``anchor + k``: one
draft forward proposes ``B - 1`` tokens (arXiv 2602.06036; z-lab/dflash; SpecForge's ``dflash.py``).

DSpark (arXiv 2607.05147; SpecForge's ``dspark.py``) trains every slot, the anchor's included: slot
``k`` predicts ``anchor + k + 1`` (``sample_from_anchor``), so a forward proposes ``B`` tokens. Its
low-rank Markov head adds ``markov_w2(markov_w1[previous token])`` to slot ``k``'s logits (the token
before the predicted one: the anchor's for slot 0, then the path's own), and its confidence head
``proj([hidden, markov_w1[previous]])`` predicts the probability that the slot is accepted, so a
proposal can stop where acceptance is unlikely.

Training: random anchors inside the reply spans, one block per anchor, all blocks of a row against
the row's context in one pass (the context mask, key ``< anchor``, is built once per batch and shared
by the layers; the block part of the attention is ``[B, B]`` per block). Decoding: one block forward
per proposal, the context's keys and values kept per layer in buffers that grow with the committed
tokens (:class:`DFlashDrafter`).

Checkpoints are the layout SGLang, vLLM and z-lab's ``DFlashDraftModel`` load (``layers.*``, ``fc``,
``hidden_norm``, ``norm``; ``dflash_config.target_layer_ids`` counted as SGLang counts, our feature
layers minus one), which speculators' DFlash converter also reads; DSpark adds SpecForge's
``markov_head.markov_w{1,2}`` and ``confidence_head.proj``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchspec_ext.drafts.base import (
    WEIGHTS_NAME,
    DraftFamily,
    DraftLoadError,
    LossFunction,
    Objective,
    load_weights,
    read_config,
    save_weights,
)
from torchspec_ext.drafts.layers import MLP, RMSNorm, rope_theta
from torchspec_ext.options import at_least, option, positive
from torchspec_ext.speculate import TreeProposer, TreeSpec

DFLASH_ARCHITECTURE = "DFlashDraftModel"
DSPARK_ARCHITECTURE = "DSparkDraftModel"
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
# A proposal as long as the draft's block allows (a chain's depth; the proposer caps it at the block).
WHOLE_BLOCK = 64
# DSpark's published loss: 0.1 cross-entropy + 0.9 L1 distance to the teacher + the confidence BCE.
DSPARK_CE, DSPARK_L1 = 0.1, 0.9
BLOCK_LOSSES = ("ce", "dpace", "teacher")
DSPARK_LOSSES = ("dspark", "teacher")
INITS = ("target", "random")


def _block_size_check(v) -> str | None:
    return None if v is None or v >= 2 else "must be >= 2 (the anchor and at least one predicted token)"


@dataclass(frozen=True)
class DFlashOptions:
    """DFlash's training options (DSpark's add to them)."""

    block_size: int = option(
        16, "positions per draft block: the anchor, then block-size - 1 mask tokens", check=_block_size_check
    )
    draft_layers: int = option(
        5, "decoder layers of the draft (and target layers it reads, as published)", check=at_least(1)
    )
    num_anchors: int | None = option(
        None, "blocks trained per conversation, at random reply positions (default: 16 on CPU, 512 on GPU)",
        check=at_least(1),
    )  # fmt: skip
    block_loss: str | None = option(
        None,
        "DFlash: ce (default), cross-entropy on the data's tokens with the published position decay (DFlash's loss); "
        "dpace, the same with D-PACE's weights (arXiv 2605.18810); teacher, the run's --loss against the teacher's "
        "top-k at each slot, with the position decay. DSpark: dspark (default), 0.1 cross-entropy + 0.9 L1 distance "
        "to the teacher's distribution (its top-k and tail) + the confidence head's BCE (DSpark's loss); teacher, "
        "the run's --loss against the teacher's top-k + the BCE",
        choices=BLOCK_LOSSES + DSPARK_LOSSES[:1],
    )
    loss_decay_gamma: float = option(
        7.0, "slot k's loss weighs exp(-(k - 1) / gamma) (7: published for blocks of 16)", check=positive
    )
    dpace_alpha: float = option(0.5, "D-PACE's smoothing of the draft's probability (--block-loss dpace)")
    sliding_window: int | None = option(
        None, "the draft's layers attend to this many positions at most (default: the whole context, as published)",
        check=at_least(2),
    )  # fmt: skip
    mask_token_id: int | None = option(
        None,
        "the token the block's predicted slots hold (default: the tokenizer's mask token, else the first embedding "
        "row past the tokenizer's vocabulary, else its highest special token that is not bos, eos, pad or unk)",
        check=at_least(0),
    )
    draft_init: str = option(
        "target", "target: the draft's layers start as copies of the target's last layers; random: as published",
        choices=INITS,
    )  # fmt: skip

    DEFAULT_LOSS = "ce"
    LOSSES = BLOCK_LOSSES

    def resolved(self, on_gpu: bool):
        return replace(
            self,
            num_anchors=self.num_anchors or (512 if on_gpu else 16),
            block_loss=self.block_loss or self.DEFAULT_LOSS,
        )

    def problems(self, title: str) -> list[str]:
        """What is wrong between the options (each a usage error)."""
        if self.block_loss is not None and self.block_loss not in self.LOSSES:
            return [f"--block-loss {self.block_loss} is not one of {title}'s: {', '.join(self.LOSSES)}"]
        return []


@dataclass(frozen=True)
class DSparkOptions(DFlashOptions):
    """DSpark's options: DFlash's, and its two heads."""

    DEFAULT_LOSS = "dspark"
    LOSSES = DSPARK_LOSSES

    markov_rank: int = option(256, "rank of the previous-token logit bias (0: none)", check=at_least(0))


def default_target_layers(num_layers: int, count: int) -> list[int]:
    """The published choice of target layers (z-lab's ``build_target_layer_ids``), as our feature
    layers: Hugging Face ``hidden_states`` indices, which are SGLang's layer ids plus one."""
    if count == 1:
        return [num_layers // 2 + 1]
    start, end = 1, num_layers - 3
    if end < start:
        start, end = 0, max(0, num_layers - 2)
    return [int(round(start + i * (end - start) / (count - 1))) + 1 for i in range(count)]


@dataclass
class DFlashConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's: the draft predicts over all of it
    num_hidden_layers: int
    block_size: int
    mask_token_id: int
    feature_layers: list[int] = field(default_factory=list)  # Hugging Face hidden_states indices
    target_num_layers: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # full_attention / sliding_attention per layer
    sample_from_anchor: bool = False  # DSpark: slot k predicts anchor + k + 1
    markov_rank: int = 0  # DSpark's previous-token bias (0: none)
    confidence_head: bool = False  # DSpark's acceptance head (on [hidden, markov embedding])

    def __post_init__(self):
        if not self.layer_types:
            kind = SLIDING_ATTENTION if self.sliding_window else FULL_ATTENTION
            self.layer_types = [kind] * self.num_hidden_layers

    @property
    def is_dspark(self) -> bool:
        return self.sample_from_anchor

    @property
    def proposals(self) -> int:
        """Tokens one block forward proposes."""
        return self.block_size if self.sample_from_anchor else self.block_size - 1

    @staticmethod
    def from_target(config, options: DFlashOptions, mask_token_id: int, dspark: bool) -> DFlashConfig:
        heads = config.num_attention_heads
        return DFlashConfig(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", heads) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            num_hidden_layers=options.draft_layers,
            block_size=options.block_size,
            mask_token_id=mask_token_id,
            feature_layers=default_target_layers(config.num_hidden_layers, options.draft_layers),
            target_num_layers=config.num_hidden_layers,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=rope_theta(config),
            max_position_embeddings=config.max_position_embeddings,
            sliding_window=options.sliding_window,
            sample_from_anchor=dspark,
            markov_rank=getattr(options, "markov_rank", 0) if dspark else 0,
            confidence_head=dspark,
        )

    def to_hf(self, dtype: str = "float32", private: bool = True) -> dict:
        """The config.json SGLang's and vLLM's ``DFlashDraftModel`` (z-lab's layout) read; DSpark's as
        SpecForge's ``DSparkDraftModel`` writes it. ``dflash_config.target_layer_ids`` counts as SGLang
        and z-lab count (the output of layer ``i``: our feature layer minus one); vLLM adds one back,
        and reads ``eagle_aux_hidden_state_layer_ids`` (our count) first."""
        dflash = {"target_layer_ids": [i - 1 for i in self.feature_layers], "mask_token_id": self.mask_token_id}
        config = {
            "architectures": [DSPARK_ARCHITECTURE if self.is_dspark else DFLASH_ARCHITECTURE],
            "model_type": "qwen3",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.num_hidden_layers,
            "num_target_layers": self.target_num_layers,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "use_sliding_window": self.sliding_window is not None,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "block_size": self.block_size,
            "eagle_aux_hidden_state_layer_ids": list(self.feature_layers),
            "torch_dtype": dtype,
            "dflash_config": dflash,
        }
        if self.is_dspark:
            heads = {
                "projector_type": "dspark",
                "attention_mode": "gqa" if self.num_key_value_heads < self.num_attention_heads else "mha",
                "sample_from_anchor": True,
                "markov_rank": self.markov_rank,
                "markov_head_type": "vanilla",
                "enable_confidence_head": self.confidence_head,
                "confidence_head_with_markov": self.confidence_head and self.markov_rank > 0,
            }
            dflash.update(heads)
            config.update(heads)
        if private:
            config["torchspec_ext"] = asdict(self)
        return config

    @staticmethod
    def from_hf(config: dict) -> DFlashConfig:
        if "torchspec_ext" in config:
            return DFlashConfig(**config["torchspec_ext"])
        dflash = config.get("dflash_config") or {}
        layers = config["num_hidden_layers"]
        target_layers = dflash.get("num_target_layers", config.get("num_target_layers")) or 0
        if config.get("eagle_aux_hidden_state_layer_ids"):
            feature_layers = list(config["eagle_aux_hidden_state_layer_ids"])
        elif dflash.get("target_layer_ids") is not None:
            feature_layers = [i + 1 for i in dflash["target_layer_ids"]]
        elif target_layers:
            feature_layers = default_target_layers(target_layers, layers)
        else:
            raise KeyError("dflash_config.target_layer_ids (and no num_target_layers to choose them from)")
        mask = dflash.get("mask_token_id", config.get("mask_token_id"))
        if mask is None:
            raise KeyError("dflash_config.mask_token_id")
        dspark = DSPARK_ARCHITECTURE in (config.get("architectures") or [])
        get = lambda key, default: dflash.get(key, config.get(key, default))
        rope = config.get("rope_parameters") or {}
        heads = config["num_attention_heads"]
        layer_types = config.get("layer_types") or []
        sliding = config.get("sliding_window") if SLIDING_ATTENTION in layer_types else None
        return DFlashConfig(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            num_hidden_layers=layers,
            block_size=int(dflash.get("block_size", config.get("block_size", 16))),
            mask_token_id=int(mask),
            feature_layers=feature_layers,
            target_num_layers=target_layers,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            sliding_window=sliding,
            layer_types=list(layer_types) or [FULL_ATTENTION] * layers,
            sample_from_anchor=bool(get("sample_from_anchor", dspark)),
            markov_rank=int(get("markov_rank", 0) or 0) if dspark else 0,
            confidence_head=bool(get("enable_confidence_head", dspark)) if dspark else False,
        )


def rope_tables(positions: Tensor, dim: int, theta: float, dtype) -> tuple[Tensor, Tensor]:
    """(cos, sin) ``[..., dim]`` of NeoX-style rotary embeddings at ``positions [...]``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x [..., heads, D]`` rotated by tables ``[..., D]`` (one per position, shared by the heads)."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def block_attention(
    q: Tensor, kc: Tensor, vc: Tensor, context_allowed: Tensor | None, kb: Tensor, vb: Tensor,
    block_allowed: Tensor | None, scale: float,
) -> Tensor:  # fmt: skip
    """Softmax attention of the blocks' queries over the context and over their own block, as one
    softmax over both parts (no dense ``[queries, context + blocks]`` mask).

    ``q [b, kv_heads, groups, N, B, D]``: ``N`` blocks of ``B`` slots per row, the query heads of one
    key/value head together; ``kc, vc [b, kv_heads, T, D]``: the row's context; ``context_allowed``
    broadcastable to ``[b, 1, 1, N, B, T]`` (None: all); ``kb, vb [b, kv_heads, N, B, D]``: the
    blocks' own keys; ``block_allowed [B, B]`` (None: all, DFlash's non-causal block). Returns
    ``[b, kv_heads, groups, N, B, D]``."""
    b, h, g, n, bs, d = q.shape
    t = kc.shape[-2]
    context = (q.reshape(b, h, g * n * bs, d) @ kc.transpose(-1, -2)).view(b, h, g, n, bs, t) * scale
    if context_allowed is not None:
        context = context.masked_fill(~context_allowed, float("-inf"))
    own = (q @ kb.unsqueeze(2).transpose(-1, -2)) * scale  # [b, h, g, N, B, B]
    if block_allowed is not None:
        own = own.masked_fill(~block_allowed, float("-inf"))
    weights = torch.softmax(torch.cat([context, own], -1).float(), -1).to(q.dtype)
    out = (weights[..., :t].reshape(b, h, g * n * bs, t) @ vc).view(b, h, g, n, bs, d)
    return out + weights[..., t:] @ vb.unsqueeze(2)


class Attention(nn.Module):
    """Qwen3's attention (per-head ``q_norm`` / ``k_norm`` before the rotation), over a block and a context."""

    def __init__(self, c: DFlashConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def context_kv(self, context: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[..., kv_heads, T, D]`` of the context ``[..., T, H]`` (rotated by ``cos, sin``)."""
        c = self.c
        k = self.k_norm(self.k_proj(context).unflatten(-1, (c.num_key_value_heads, c.head_dim)))
        v = self.v_proj(context).unflatten(-1, (c.num_key_value_heads, c.head_dim))
        return rotate(k, cos, sin).transpose(-2, -3), v.transpose(-2, -3)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor, context_allowed, block_allowed):
        """``x [b, N, B, H]`` (rotated by ``cos, sin [b, N, B, D]``) against the context's ``kc, vc [b, kv, T, D]``."""
        c = self.c
        b, n, bs, _ = x.shape
        kv, groups = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
        q = rotate(self.q_norm(self.q_proj(x).unflatten(-1, (c.num_attention_heads, c.head_dim))), cos, sin)
        k = rotate(self.k_norm(self.k_proj(x).unflatten(-1, (kv, c.head_dim))), cos, sin)
        v = self.v_proj(x).unflatten(-1, (kv, c.head_dim))
        q = q.view(b, n, bs, kv, groups, c.head_dim).permute(0, 3, 4, 1, 2, 5)  # [b, kv, g, N, B, D]
        k, v = k.permute(0, 3, 1, 2, 4), v.permute(0, 3, 1, 2, 4)  # [b, kv, N, B, D]
        out = block_attention(q, kc, vc, context_allowed, k, v, block_allowed, 1.0 / math.sqrt(c.head_dim))
        return self.o_proj(out.permute(0, 3, 4, 1, 2, 5).reshape(b, n, bs, -1))


class DecoderLayer(nn.Module):
    def __init__(self, c: DFlashConfig, index: int):
        super().__init__()
        self.sliding = c.layer_types[index] == SLIDING_ATTENTION
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)

    def forward(self, x, cos, sin, kc, vc, context_allowed, block_allowed):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kc, vc, context_allowed, block_allowed)
        return x + self.mlp(self.post_attention_layernorm(x))


class MarkovHead(nn.Module):
    """DSpark's previous-token logit bias ``markov_w2(markov_w1[token])`` (rank ``r``)."""

    def __init__(self, vocab_size: int, rank: int):
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)


class ConfidenceHead(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.proj = nn.Linear(size, 1)


class _ScaleRowGrad(torch.autograd.Function):
    """Identity whose backward multiplies row ``n``'s gradient by ``scale[n]``; ``scale`` may be filled
    after the forward (before the backward): D-PACE's weights need every slot's loss first."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale  # not saved for backward: it is written after this forward, on purpose
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale[:, None].to(grad.dtype), None


@dataclass
class _Blocks:
    """A batch's sampled blocks: ``anchors [b, N]`` (0 where ``keep`` is False), ``keep [b, N]``."""

    anchors: Tensor
    keep: Tensor


class DFlashDraft(nn.Module):
    def __init__(self, c: DFlashConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        for frozen in (self.embed_tokens.weight, self.lm_head.weight):  # the target's
            frozen.requires_grad_(False)
        self.fc = nn.Linear(len(c.feature_layers) * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.markov_head = MarkovHead(c.vocab_size, c.markov_rank) if c.markov_rank else None
        self.confidence_head = ConfidenceHead(c.hidden_size + c.markov_rank) if c.confidence_head else None
        for p in self.parameters():
            if p.requires_grad and p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        if self.markov_head is not None:  # the bias starts at zero: DSpark starts as DFlash
            nn.init.zeros_(self.markov_head.markov_w2.weight)

    # --- the interface the run uses -------------------------------------------------------------
    @property
    def feature_layers(self) -> list[int]:
        return list(self.config.feature_layers)

    def draft_to_target(self) -> Tensor:
        return torch.arange(self.config.vocab_size, device=self.fc.weight.device)

    def target_to_draft(self) -> Tensor:
        return self.draft_to_target()

    @torch.no_grad()
    def init_from_target(self, target, copy_layers: bool) -> None:
        """The target's embedding and LM head (frozen), its final norm as the draft's; ``fc`` the
        identity on the highest feature layer. With ``copy_layers``, draft layer ``i`` starts as a
        copy of the target's ``i``-th of its last ``num_hidden_layers`` layers (``q_norm`` / ``k_norm``
        at one where the target has none)."""
        self.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
        self.lm_head.weight.copy_(target.get_output_embeddings().weight)
        model = target.model
        self.norm.weight.copy_(model.norm.weight)
        h = self.config.hidden_size
        self.fc.weight.zero_()
        self.fc.weight[:, -h:].copy_(torch.eye(h))
        if not copy_layers:
            return
        source = list(model.layers)[-len(self.layers) :]
        for mine, theirs in zip(self.layers, source):
            own = mine.state_dict()
            for name, tensor in theirs.state_dict().items():
                if name in own and own[name].shape == tensor.shape:
                    own[name].copy_(tensor)

    # --- the blocks -----------------------------------------------------------------------------
    def context(self, features: Tensor) -> Tensor:
        """The target's features ``[..., T, n * H]`` as the context every layer reads ``[..., T, H]``."""
        return self.hidden_norm(self.fc(features))

    def run_blocks(self, context: Tensor, block_ids: Tensor, positions: Tensor, allowed: dict) -> Tensor:
        """The normed output ``[b, N, B, H]`` of blocks ``block_ids [b, N, B]`` at ``positions [b, N, B]``
        against ``context [b, T, H]`` (at positions ``0 .. T - 1``); ``allowed``: per layer kind
        (sliding or not), the (context, block) masks of :func:`block_attention`."""
        c = self.config
        x = self.embed_tokens(block_ids)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, x.dtype)
        t = context.shape[-2]
        ccos, csin = rope_tables(torch.arange(t, device=x.device), c.head_dim, c.rope_theta, x.dtype)
        for layer in self.layers:
            kc, vc = layer.self_attn.context_kv(context, ccos, csin)
            x = layer(x, cos, sin, kc, vc, *allowed[layer.sliding])
        return self.norm(x)

    def attention_masks(self, anchors: Tensor, t: int) -> dict:
        """Per layer kind, the (context, block) masks of blocks at ``anchors [b, N]`` over a context of
        ``t`` positions: context key ``j`` is allowed for slot ``k`` when ``j < anchor`` (its features
        exist when the block is drafted), and in a sliding layer also when ``j > anchor + k - window``;
        a sliding layer's block is causal (as SpecForge and vLLM have it). Made once per batch."""
        c = self.config
        key = torch.arange(t, device=anchors.device)
        before = key < anchors[..., None]  # [b, N, T]
        masks = {False: (before[:, None, None, :, None, :], None)}
        if c.sliding_window is not None:
            slot = torch.arange(c.block_size, device=anchors.device)
            low = anchors[..., None, None] + slot[:, None] - c.sliding_window  # [b, N, B, 1]
            window = before[:, :, None, :] & (key > low)
            masks[True] = (window[:, None, None], slot[None, :] <= slot[:, None])
        return masks

    def sample_blocks(self, loss_mask: Tensor, count: int) -> _Blocks:
        """Up to ``count`` anchors per row, at random among the positions ``a`` whose token and next
        token are both in the loss mask (as SpecForge and speculators sample them); torch's random
        generator, so each pass over a replayed batch draws new ones and a resumed run the same."""
        b, t = loss_mask.shape
        valid = loss_mask[:, :-1] & loss_mask[:, 1:]
        counts = valid.sum(1)
        n = max(1, min(count, int(counts.max()) if t > 1 else 0))
        if t < 2 or int(counts.max()) == 0:
            zeros = torch.zeros(b, n, dtype=torch.long, device=loss_mask.device)
            return _Blocks(zeros, zeros.bool())
        noise = torch.rand(valid.shape, device=loss_mask.device).masked_fill(~valid, 2.0)
        chosen = noise.argsort(1)[:, :n]
        keep = torch.arange(n, device=loss_mask.device)[None] < counts.clamp(max=n)[:, None]
        anchors = torch.where(keep, chosen, 0)
        return _Blocks(anchors, keep)

    def block_inputs(self, input_ids: Tensor, blocks: _Blocks) -> tuple[Tensor, Tensor]:
        """(token ids, positions), ``[b, N, B]`` each: the anchor's token then mask tokens."""
        c = self.config
        b, n = blocks.anchors.shape
        ids = torch.full((b, n, c.block_size), c.mask_token_id, dtype=torch.long, device=input_ids.device)
        ids[:, :, 0] = input_ids.gather(1, blocks.anchors)
        positions = blocks.anchors[..., None] + torch.arange(c.block_size, device=input_ids.device)
        return ids, positions

    # --- training ---------------------------------------------------------------------------------
    def forward(self, batch, loss: LossFunction, options: DFlashOptions) -> Objective:
        """The training objective on a teacher batch: ``options.num_anchors`` random blocks per row, the
        loss of every supervised slot (``options.block_loss``) weighted by its place in the block.

        All the slots' rows go through one call of the loss (one pass over the LM head); each row's
        weight reaches the gradient through its scale (:class:`_ScaleRowGrad`). ``Objective.losses``
        are per slot the cross-entropy on the data's tokens, ``accuracies`` the agreement with the
        teacher's argmax; ``total``'s value is the weighted loss (with ``teacher``, the run's loss,
        whose rows this cannot weigh after the fact, its plain mean over the rows)."""
        c = self.config
        ids, mask = batch.input_ids, batch.loss_mask
        blocks = self.sample_blocks(mask, options.num_anchors)
        block_ids, positions = self.block_inputs(ids, blocks)
        hidden = self.run_blocks(
            self.context(batch.features.to(self.fc.weight.dtype)), block_ids, positions,
            self.attention_masks(blocks.anchors, ids.shape[1]),
        )  # fmt: skip
        rows = self.supervised_rows(blocks, mask)
        b_idx, n_idx, slot = rows
        position = blocks.anchors[b_idx, n_idx] + slot + 1  # the predicted token's
        h = hidden[b_idx, n_idx, slot + (0 if c.sample_from_anchor else 1)]
        token = ids[b_idx, position]
        t_idx, t_lp = batch.teacher_indices[b_idx, position - 1], batch.teacher_logprobs[b_idx, position - 1]
        t_arg = batch.teacher_argmax[b_idx, position - 1]
        count = len(slot)
        if count == 0:
            zero = hidden.sum() * 0
            return Objective(zero, [zero.detach()] * c.proposals, [0.0] * c.proposals, 0)
        decay = torch.exp(-slot.float() / options.loss_decay_gamma)
        prev_embed = None
        if c.is_dspark:
            previous = ids[b_idx, position - 1]
            argmax, lse, total, prev_embed = self._dspark_loss(h, previous, t_idx, t_lp, slot, decay, loss, options)
        else:
            shape = blocks.anchors.shape
            argmax, lse, total = self._dflash_loss(h, token, t_idx, t_lp, rows, shape, decay, loss, options)
        with torch.no_grad():
            ce = lse.float() - (h.float() * self.lm_head.weight[token].float()).sum(-1)
            if prev_embed is not None:  # the Markov bias of the previous token
                ce = ce - (self.markov_head.markov_w2.weight[token].float() * prev_embed.float()).sum(-1)
            slots = c.proposals
            per_slot = torch.zeros(slots, device=h.device).index_add_(0, slot, ce)
            seen = torch.bincount(slot, minlength=slots)
            hits = torch.zeros(slots, device=h.device).index_add_(0, slot, (argmax == t_arg).float())
        losses = list((per_slot / seen.clamp(min=1)).unbind())
        accuracies = (hits / seen.clamp(min=1)).tolist()
        return Objective(total, losses, accuracies, int(seen[0]))

    def supervised_rows(self, blocks: _Blocks, loss_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(row, block, slot) ``[M]`` each of the supervised predictions: slot ``s`` (counting the
        predicting slots from 0) predicts the token at ``anchor + s + 1``, supervised where it is
        inside the row and in the loss mask; DSpark's only while every earlier slot of its block is
        (SpecForge trains it so), DFlash's whatever the others."""
        c = self.config
        t = loss_mask.shape[1]
        position = blocks.anchors[..., None] + torch.arange(1, c.proposals + 1, device=loss_mask.device)
        ok = blocks.keep[..., None] & (position < t)
        ok = ok & loss_mask.gather(1, position.clamp(max=t - 1).flatten(1)).view_as(ok)
        if c.sample_from_anchor:
            ok = ok.int().cumprod(-1).bool()
        return ok.nonzero(as_tuple=True)

    def _dflash_loss(self, h, token, t_idx, t_lp, rows, blocks_shape, decay, loss, options):
        """DFlash's loss on the rows ``h [M, H]``: (argmax, lse, the objective). The target's LM head is
        frozen, so one call of the loss weighs every row through its scale (:class:`_ScaleRowGrad`),
        filled after the call: D-PACE's weights need each row's cross-entropy first."""
        m = len(token)
        scale = torch.ones(m, device=h.device)
        h_scaled = _ScaleRowGrad.apply(h, scale)
        if options.block_loss == "teacher":
            value, argmax, lse = loss(h_scaled, self.lm_head.weight, t_idx, t_lp)
        else:  # the data's token as a one-entry teacher: its cross-entropy
            value, argmax, lse = loss(h_scaled, self.lm_head.weight, token[:, None], h.new_zeros(m, 1))
        with torch.no_grad():
            ce = lse.float() - (h.float() * self.lm_head.weight[token].float()).sum(-1)
            if options.block_loss == "dpace":
                weights = dpace_weights(ce, rows, blocks_shape, self.config.proposals, options.dpace_alpha)
                scale.copy_(weights)  # the mean over the rows, each scaled by w: sum_r w_r ce_r / M
                reported = (weights * ce).mean()
            else:
                scale.copy_(decay * m / decay.sum())
                reported = (decay * ce).sum() / decay.sum() if options.block_loss == "ce" else value.detach()
        return argmax, lse, reported + (value - value.detach())

    def _dspark_loss(self, h, previous, t_idx, t_lp, slot, decay, loss, options):
        """DSpark's loss on the rows ``h [M, H]`` whose previous tokens are ``previous [M]``: the logits
        with the Markov bias (as ``[h, markov_w1[previous]] @ [lm_head, markov_w2]^T`` in the fused op);
        ``block_loss`` dspark: 0.1 * the cross-entropy to the teacher's top-k + 0.9 * the L1 distance to
        the teacher, ``2 (1 - alpha)`` with ``alpha`` the op's LK estimate of the acceptance over the
        top-k and its tail (SpecForge's ``dspark`` has the target's whole distribution and the data's
        token; we have the teacher's top-k); teacher: the run's ``--loss``. Plus the confidence head's
        binary cross-entropy against ``alpha``. Returns (argmax, lse, the objective, Markov embeddings
        of ``previous`` or None)."""
        markov = self.markov_head
        prev_embed = markov.markov_w1(previous).to(h.dtype) if markov is not None else None
        h_all = h if prev_embed is None else torch.cat([h, prev_embed], -1)
        weight = (
            self.lm_head.weight if markov is None else torch.cat([self.lm_head.weight, markov.markov_w2.weight], -1)
        )
        if options.block_loss == "dspark":
            op = getattr(loss, "op", None)
            if op is None:
                raise TypeError("DSpark's loss needs the run's fused op (training.losses.loss_function gives it)")
            # lk_lambda with a constant KL weight s: s KL + (1 - s)(1 - alpha), scaled to 0.1 KL + 0.9 * 2 (1 - alpha)
            share = DSPARK_CE / (DSPARK_CE + 2 * DSPARK_L1)
            fn = lambda *args: _scaled(op(*args, loss="lk_lambda", kl_scale=share, kl_decay=0.0), DSPARK_CE / share)
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
        if self.confidence_head is not None:
            logit = self.confidence_head.proj(h_all).squeeze(-1).float()
            bce = F.binary_cross_entropy_with_logits(logit, alpha, reduction="none")
            total = total + (decay * bce).sum() / decay.sum()
        return argmax, lse, total, prev_embed

    # --- checkpoints ------------------------------------------------------------------------------
    def trained_state(self) -> dict[str, Tensor]:
        """The checkpoint's tensors: the target's embedding and LM head excluded."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("embed_tokens.", "lm_head."))}

    def save(self, directory: str | Path, dtype: torch.dtype | None = None, private: bool = True) -> None:
        dtype_name = str(dtype or self.fc.weight.dtype).removeprefix("torch.")
        save_weights(Path(directory), self.trained_state(), self.config.to_hf(dtype_name, private), dtype)

    @staticmethod
    def load(directory: str | Path, target=None, family: type[DraftFamily] | None = None) -> DFlashDraft:
        """A saved or exported draft; the embedding and LM head from ``target`` (without one they stay
        zero: enough to read or re-export the trained weights, not to draft)."""
        from safetensors.torch import load_file

        from torchspec_ext.drafts import check_family

        directory = Path(directory)
        raw = read_config(directory)
        check_family(raw, family or DFlashFamily, directory)
        try:
            config = DFlashConfig.from_hf(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise DraftLoadError(f"{directory}: unreadable DFlash config ({type(exc).__name__}: {exc})") from None
        draft = DFlashDraft(config)
        state = load_file(str(directory / WEIGHTS_NAME))
        frozen = ["embed_tokens.weight", "lm_head.weight"]
        if target is not None:
            state["embed_tokens.weight"] = target.get_input_embeddings().weight.detach().float().cpu()
            state["lm_head.weight"] = target.get_output_embeddings().weight.detach().float().cpu()
        else:
            for name in frozen:
                draft.get_parameter(name).data.zero_()
        load_weights(draft, directory, state, frozen, "DSpark" if config.is_dspark else "DFlash")
        return draft


def _scaled(result, factor: float):
    value, argmax, lse = result
    return value * factor, argmax, lse


def weighted_loss(fn: LossFunction, hidden: Tensor, weight: Tensor, ids, logprobs, slot: Tensor, decay: Tensor):
    """``fn`` (a loss that is a mean over rows) weighted per row by ``decay`` (constant within a
    ``slot``): (value, argmax, lse). With a frozen ``weight``, one call, each row's weight reaching
    the gradient through its scale (:class:`_ScaleRowGrad`; the value is then the plain mean). With a
    trained one (DSpark's Markov bias), the op's weight gradient is a plain mean over its rows, which
    no scale of the rows reweighs: one call per slot (the value is then the weighted mean)."""
    norm = decay.sum()
    if not weight.requires_grad:
        return fn(_ScaleRowGrad.apply(hidden, decay * len(decay) / norm), weight, ids, logprobs)
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


class DFlashDrafter:
    """A :class:`DFlashDraft` behind the decoder's ``StepDraft`` interface: one block forward per
    context, whatever the number of paths asked about.

    ``speculative_generate`` hands it the target's features of every committed token but the last
    (``reset`` after the prefill, ``observe`` after each verification); each layer's context keys and
    values live in buffers that grow by doubling, so a round computes only the newly committed
    tokens and the block. ``next_logprobs(context, paths)`` returns, per path, the log-probabilities of
    the slot that predicts the token after ``context + path`` (DFlash: slot ``len(path) + 1``; DSpark:
    slot ``len(path)`` with the Markov bias of the path's last token, the anchor's for an empty path).
    """

    def __init__(self, draft: DFlashDraft):
        self.draft = draft.eval()
        self.config = draft.config
        self.feature_layers = list(draft.config.feature_layers)
        self.device = draft.fc.weight.device
        self.dtype = draft.fc.weight.dtype
        self.reset(torch.empty(0, draft.fc.in_features, device=self.device))

    def reset(self, features: Tensor) -> None:
        """Start a new sequence whose first ``len(features)`` tokens the target has seen."""
        c = self.config
        self.pending = features.to(self.device, self.dtype)
        self.length = 0  # context positions whose keys are in the buffers
        shape = (c.num_hidden_layers, c.num_key_value_heads, 64, c.head_dim)
        self.keys = torch.empty(shape, device=self.device, dtype=self.dtype)
        self.values = torch.empty_like(self.keys)
        self.block_context = -1
        self.hidden = self.logits = None

    def observe(self, features: Tensor) -> None:
        """The target's features of newly committed tokens, in order."""
        self.pending = torch.cat([self.pending, features.to(self.pending)])

    def _grow(self, need: int) -> None:
        if need > self.keys.shape[2]:
            size = max(need, 2 * self.keys.shape[2])
            keys = self.keys.new_empty(self.keys.shape[:2] + (size, self.keys.shape[-1]))
            values = torch.empty_like(keys)
            keys[:, :, : self.length], values[:, :, : self.length] = (
                self.keys[:, :, : self.length],
                self.values[:, :, : self.length],
            )
            self.keys, self.values = keys, values

    @torch.no_grad()
    def _extend_context(self, context) -> None:
        n, done = len(context), self.length
        if done + self.pending.shape[0] != n - 1:
            raise RuntimeError(
                f"DFlashDrafter: {done + self.pending.shape[0]} feature rows for a context of {n} tokens "
                f"({n - 1} expected); speculative_generate feeds them"
            )
        if done == n - 1:
            return
        c, d = self.config, self.draft
        hidden = d.context(self.pending)
        cos, sin = rope_tables(torch.arange(done, n - 1, device=self.device), c.head_dim, c.rope_theta, hidden.dtype)
        self._grow(n - 1)
        for i, layer in enumerate(d.layers):
            k, v = layer.self_attn.context_kv(hidden, cos, sin)  # [kv, new, D]
            self.keys[i, :, done : n - 1], self.values[i, :, done : n - 1] = k, v
        self.length, self.pending = n - 1, self.pending[:0]

    @torch.no_grad()
    def _run_block(self, context) -> None:
        """The block after ``context``: its normed hidden states ``[B, H]`` and base logits ``[B, V]``."""
        c, d = self.config, self.draft
        anchor = len(context) - 1
        ids = torch.full((1, 1, c.block_size), c.mask_token_id, dtype=torch.long, device=self.device)
        ids[0, 0, 0] = context[-1]
        positions = anchor + torch.arange(c.block_size, device=self.device)[None, None]
        anchors = torch.full((1, 1), anchor, dtype=torch.long, device=self.device)
        allowed = d.attention_masks(anchors, anchor)
        allowed[False] = (None, None)  # every context key is before the anchor
        x = d.embed_tokens(ids)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, x.dtype)
        for i, layer in enumerate(d.layers):
            kc, vc = self.keys[i : i + 1, :, :anchor], self.values[i : i + 1, :, :anchor]
            x = layer(x, cos, sin, kc, vc, *allowed[layer.sliding])
        self.hidden = d.norm(x)[0, 0]
        self.logits = d.lm_head(self.hidden).float()
        self.block_context = len(context)

    def _prepare(self, context) -> None:
        self._extend_context(context)
        if self.block_context != len(context):
            self._run_block(context)

    def _slots(self, context, paths) -> tuple[Tensor, Tensor]:
        """(slot [P], previous token [P]) of each path."""
        c = self.config
        lengths = [len(p) for p in paths]
        if max(lengths, default=0) >= c.proposals:
            raise ValueError(
                f"a {'DSpark' if c.is_dspark else 'DFlash'} block of {c.block_size} proposes {c.proposals} tokens; "
                f"a path of {max(lengths)} asks for the next one (cap the proposal's depth)"
            )
        shift = 0 if c.sample_from_anchor else 1
        slots = torch.tensor([n + shift for n in lengths], device=self.device)
        previous = torch.tensor([p[-1] if len(p) else context[-1] for p in paths], device=self.device)
        return slots, previous

    @torch.no_grad()
    def next_logprobs(self, context, paths) -> Tensor:
        self._prepare(context)
        slots, previous = self._slots(context, [list(p) for p in paths])
        logits = self.logits[slots]
        markov = self.draft.markov_head
        if markov is not None:
            logits = logits + markov.markov_w2(markov.markov_w1(previous)).float()
        return torch.log_softmax(logits, -1)

    @torch.no_grad()
    def confidence(self, context, paths) -> Tensor:
        """DSpark: the head's probability ``[P]`` that the token after each path is accepted."""
        head = self.draft.confidence_head
        if head is None:
            raise ValueError("this draft has no confidence head")
        self._prepare(context)
        slots, previous = self._slots(context, [list(p) for p in paths])
        features = self.hidden[slots]
        if self.draft.markov_head is not None:
            features = torch.cat([features, self.draft.markov_head.markov_w1(previous).to(features)], -1)
        return torch.sigmoid(head.proj(features).squeeze(-1).float())


@dataclass
class ConfidenceSpec(TreeSpec):
    """DSpark's proposal: a greedy chain of up to ``depth`` tokens, cut where the confidence head's
    cumulative probability of acceptance falls below ``min_confidence`` (the first token is always
    proposed: verifying it costs next to nothing)."""

    min_confidence: float = 0.5


class ConfidenceChain:
    """The proposer of a :class:`ConfidenceSpec`."""

    def __init__(self, drafter: DFlashDrafter, spec: ConfidenceSpec):
        self.drafter, self.spec = drafter, spec
        self.feature_layers = drafter.feature_layers

    def reset(self, features: Tensor | None) -> None:
        self.drafter.reset(features)

    def observe(self, features: Tensor | None) -> None:
        self.drafter.observe(features)

    def propose(self, context) -> tuple[Tensor, Tensor]:
        path, expected = [], 1.0
        for _ in range(min(self.spec.depth, self.drafter.config.proposals)):
            expected *= float(self.drafter.confidence(context, [path])[0])
            if path and expected < self.spec.min_confidence:
                break
            path.append(int(self.drafter.next_logprobs(context, [path])[0].argmax()))
        tokens = torch.tensor([context[-1], *path], dtype=torch.long)
        return tokens, torch.arange(-1, len(path), dtype=torch.long)


def choose_mask_token(target) -> int:
    """The mask token of a target (``--mask-token-id`` unset): its tokenizer's mask token; else the first
    embedding row past the tokenizer's vocabulary (an unused slot, as z-lab's Qwen3 drafts use); else
    the tokenizer's highest added special token that is not its bos, eos, pad or unk token (for
    SmolLM2, ``<empty_output>``, id 16: a code-data marker that chat data never holds)."""
    from transformers import AutoTokenizer

    vocab = target.config.vocab_size
    try:
        tokenizer = AutoTokenizer.from_pretrained(target.name_or_path)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"no tokenizer beside the target ({exc.__class__.__name__}) to choose the mask token from: give "
            "--mask-token-id (a token id that the data never holds)"
        ) from None
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id < vocab:
        return int(tokenizer.mask_token_id)
    if len(tokenizer) < vocab:
        return len(tokenizer)
    special = {getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad", "unk")}
    candidates = [i for i in tokenizer.added_tokens_decoder if i not in special and i < vocab]
    if not candidates:
        raise ValueError("the target's tokenizer has no spare special token for the mask: give --mask-token-id")
    return max(candidates)


class _BlockFamily(DraftFamily):
    """What DFlash and DSpark share; each is its own family (a folder of one does not load as the other)."""

    dspark: bool

    def new_draft(self, target, token_sample: Sequence[tuple[Tensor, Tensor]], options) -> DFlashDraft:
        """A draft shaped like the target's layers, ``options.draft_layers`` deep, reading as many
        target layers (the published choice), initialised from the target."""
        problems = options.problems(self.title)
        if problems:
            raise ValueError("; ".join(problems))
        vocab, layers = target.config.vocab_size, target.config.num_hidden_layers
        mask = options.mask_token_id if options.mask_token_id is not None else choose_mask_token(target)
        if not 0 <= mask < vocab:
            raise ValueError(f"--mask-token-id {mask} is not a token of the target (0 to {vocab - 1})")
        if options.draft_layers > layers:
            raise ValueError(f"--draft-layers {options.draft_layers}: the target has {layers} layers")
        draft = DFlashDraft(DFlashConfig.from_target(target.config, options, mask, self.dspark))
        draft.init_from_target(target, copy_layers=options.draft_init == "target")
        return draft

    def config_from(self, config: dict) -> DFlashConfig:
        return DFlashConfig.from_hf(config)

    def load(self, directory: Path, target=None) -> DFlashDraft:
        return DFlashDraft.load(directory, target, type(self))

    def proposer(self, draft: DFlashDraft, spec: TreeSpec):
        """One block forward per proposal; ``spec``'s depth capped at the block's proposals."""
        cap = draft.config.proposals
        spec = replace(spec, depth=min(spec.depth, cap), max_nodes=min(spec.max_nodes, cap * max(1, spec.topk)))
        drafter = DFlashDrafter(draft)
        if isinstance(spec, ConfidenceSpec):
            return ConfidenceChain(drafter, spec)
        return TreeProposer(drafter, spec)

    def decode_modes(self, depth: int, topk: int, max_nodes: int, min_prob: float) -> dict[str, TreeSpec]:
        """The whole block as a chain (the published verification); a tree of the ``topk`` best tokens
        of each slot (``max_nodes`` nodes); and with ``min_prob`` > 0 each cut below that cumulative
        draft probability. ``depth`` is not used: a block proposes what it holds."""
        modes = {"block": TreeSpec.chain(WHOLE_BLOCK)}
        if topk > 1:
            modes["tree"] = TreeSpec(WHOLE_BLOCK, topk, max_nodes)
        if min_prob > 0:
            modes |= {f"{name}, p >= {min_prob:g}": replace(spec, min_prob=min_prob) for name, spec in modes.items()}
        return modes

    def export_problems(self, draft: DFlashDraft) -> tuple[list[str], list[str]]:
        c, errors, warnings = draft.config, [], []
        if not 0 <= c.mask_token_id < c.vocab_size:
            errors.append(f"mask token {c.mask_token_id} is outside the vocabulary of {c.vocab_size}")
        odd = [i for i in c.feature_layers if i < 1 or (c.target_num_layers and i >= c.target_num_layers)]
        if odd:
            warnings.append(
                f"feature layers {odd} are the target's embeddings or its final (normed) hidden state; SGLang and "
                "vLLM capture the outputs of layers 0..L-2 (dflash_config.target_layer_ids), so they will not feed "
                "this draft what it was trained on"
            )
        return errors, warnings


class DFlashFamily(_BlockFamily):
    name = "dflash"
    title = "DFlash"
    architectures = (DFLASH_ARCHITECTURE,)
    Options = DFlashOptions
    dspark = False


class DSparkFamily(_BlockFamily):
    name = "dspark"
    title = "DSpark"
    architectures = (DSPARK_ARCHITECTURE,)
    Options = DSparkOptions
    dspark = True

    def decode_modes(self, depth: int, topk: int, max_nodes: int, min_prob: float) -> dict[str, TreeSpec]:
        """DFlash's modes, and the block cut by the confidence head where its cumulative probability of
        acceptance falls below ``min_prob`` (0.5 when ``min_prob`` is 0)."""
        modes = super().decode_modes(depth, topk, max_nodes, min_prob)
        cut = min_prob if min_prob > 0 else 0.5
        return {"block": modes.pop("block"), f"block, confidence >= {cut:g}": ConfidenceSpec(
            WHOLE_BLOCK, 1, WHOLE_BLOCK, 0.0, cut)} | modes  # fmt: skip
