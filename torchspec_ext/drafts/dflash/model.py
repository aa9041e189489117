"""The DFlash / DSpark draft network: Qwen3-style decoder layers over blocks of the anchor token and
mask tokens, attending without a causal mask inside a block and to keys and values projected from the
target's features before the anchor; DSpark's Markov (previous-token) and confidence heads."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from torchspec_ext.drafts.base import LossFunction, Objective, save_weights
from torchspec_ext.drafts.dflash.config import SLIDING_ATTENTION, DFlashConfig
from torchspec_ext.drafts.dflash.objective import block_objective
from torchspec_ext.drafts.dflash.options import DFlashOptions
from torchspec_ext.drafts.layers import MLP, RMSNorm


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


class DFlashDraft(nn.Module):
    def __init__(self, c: DFlashConfig):
        super().__init__()
        self.config = c
        self.metadata: dict = {}  # how it was trained (drafts.base.training_metadata), saved in config.json
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

    def block_inputs(self, input_ids: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
        """(token ids, positions), ``[b, N, B]`` each, of the blocks at ``anchors [b, N]``: the anchor's
        token then mask tokens."""
        c = self.config
        b, n = anchors.shape
        ids = torch.full((b, n, c.block_size), c.mask_token_id, dtype=torch.long, device=input_ids.device)
        ids[:, :, 0] = input_ids.gather(1, anchors)
        positions = anchors[..., None] + torch.arange(c.block_size, device=input_ids.device)
        return ids, positions

    # --- training ---------------------------------------------------------------------------------
    def forward(self, batch, loss: LossFunction, options: DFlashOptions) -> Objective:
        """The training objective on a teacher batch (:func:`objective.block_objective`)."""
        return block_objective(self, batch, loss, options)

    # --- checkpoints ------------------------------------------------------------------------------
    def trained_state(self) -> dict[str, Tensor]:
        """The checkpoint's tensors: the target's embedding and LM head excluded."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("embed_tokens.", "lm_head."))}

    def save(self, directory: str | Path, dtype: torch.dtype | None = None, private: bool = True) -> None:
        """config.json (the engines' layout, and ``training``: :attr:`metadata`) and model.safetensors;
        floating-point tensors cast to ``dtype`` if given."""
        dtype_name = str(dtype or self.fc.weight.dtype).removeprefix("torch.")
        config = self.config.to_hf(dtype_name, private) | ({"training": self.metadata} if self.metadata else {})
        save_weights(Path(directory), self.trained_state(), config, dtype)
