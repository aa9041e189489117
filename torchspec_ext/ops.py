"""Python wrappers of the ``torch.ops.torchspec`` ops, with their fake (meta) kernels.

Every op runs on CPU and CUDA tensors, under autograd where it has a gradient, and under
``torch.compile(fullgraph=True)``. Argument errors are raised by the compiled checks with the
argument named (``RuntimeError`` / ``torch.fx`` wraps them under compile).
"""

import torch
from torch import Tensor

__all__ = [
    "topk_logprobs",
    "linear_topk_logprobs",
    "draft_topk_kl",
    "DRAFT_LOSSES",
    "tree_attention",
    "verify_tree_greedy",
    "verify_tree_sampling",
    "small_rows_linear",
    "MAX_TOPK",
]

#: Largest k supported by the top-k ops.
MAX_TOPK = 1024


def topk_logprobs(logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k log-probabilities of ``softmax(logits / temperature)`` and the log-sum-exp, in one read.

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16; rows may be strided.
        k: ``1 <= k <= min(V, 1024)``.
        temperature: ``> 0``.

    Returns:
        ``(logprobs, indices, lse)``: ``logprobs [..., k]`` float32 sorted descending,
        ``indices [..., k]`` int64 (among equal logits the lower index first),
        ``lse [...]`` float32 with ``lse = log(sum_v exp(logits[..., v] / temperature))`` and
        ``logprobs = logits[..., indices] / temperature - lse``.

    Non-finite logits give what the float64 formula gives: a row holding NaN has ``lse = NaN`` and
    NaN log-probabilities, its NaNs ranked first (as ``torch.topk`` ranks them); a row holding
    ``+inf`` has ``lse = +inf``, log-probability NaN at the ``+inf`` entries and ``-inf`` elsewhere;
    a row of only ``-inf`` has ``lse = -inf`` and NaN log-probabilities; ``-inf`` entries of an
    otherwise finite row have log-probability ``-inf``.
    """
    return torch.ops.torchspec.topk_logprobs.default(logits, k, temperature)


def linear_topk_logprobs(
    hidden: Tensor, weight: Tensor, k: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``topk_logprobs(hidden @ weight.T, k, temperature)`` without materialising ``[tokens, V]``.

    Args:
        hidden: ``[..., H]`` float32, bfloat16 or float16.
        weight: ``[V, H]`` of the same dtype and device (the LM head).

    The logits are computed tile by tile (a block of rows times a vocabulary chunk, in the
    input dtype as ``hidden @ weight.T`` would be) and each tile is merged into a running
    top-k and log-sum-exp, so the extra memory is one tile.
    """
    return torch.ops.torchspec.linear_topk_logprobs.default(hidden, weight, k, temperature)


def _topk_outputs(batch_shape, k: int, like: Tensor):
    shape = list(batch_shape)
    return (
        like.new_empty(shape + [k], dtype=torch.float32),
        like.new_empty(shape + [k], dtype=torch.int64),
        like.new_empty(shape, dtype=torch.float32),
    )


def _check_k(k: int, vocab: int, op: str) -> None:
    # Mirrors the compiled check so that shapes under torch.compile are never built from a bad k.
    if not 1 <= k <= min(vocab, MAX_TOPK):
        raise RuntimeError(f"torchspec.{op}: k must be in [1, min(V, {MAX_TOPK})], got k={k} with V={vocab}")


@torch.library.register_fake("torchspec::topk_logprobs")
def _topk_logprobs_fake(logits, k, temperature=1.0):
    _check_k(k, logits.shape[-1], "topk_logprobs")
    return _topk_outputs(logits.shape[:-1], k, logits)


@torch.library.register_fake("torchspec::linear_topk_logprobs")
def _linear_topk_logprobs_fake(hidden, weight, k, temperature=1.0):
    torch._check(weight.dim() == 2, lambda: "torchspec.linear_topk_logprobs: weight must be 2-D [V, H]")
    torch._check(
        weight.shape[1] == hidden.shape[-1],
        lambda: "torchspec.linear_topk_logprobs: weight must be [V, H] with H = hidden.size(-1)",
    )
    _check_k(k, weight.shape[0], "linear_topk_logprobs")
    return _topk_outputs(hidden.shape[:-1], k, hidden)


# Gradients (rarely needed: the teacher's outputs are targets). With p = softmax(logits / T),
#   d lse / d logits = p / T  and  d logprobs[i] / d logits = (onehot(indices[i]) - p) / T,
# so grad_logits = (scatter(grad_logprobs) + p * (grad_lse - sum(grad_logprobs))) / T, which is
# computed densely: the backward holds [..., V] even though the forward does not.
def _logits_grad(logits, indices, lse, temperature, grad_values, grad_lse):
    if grad_values is None:
        grad_values = torch.zeros(indices.shape, dtype=torch.float32, device=lse.device)
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    probs = torch.exp(logits.float() / temperature - lse.unsqueeze(-1))
    grad = probs * (grad_lse - grad_values.sum(-1)).unsqueeze(-1)
    grad = grad.scatter_add(-1, indices, grad_values)
    return grad / temperature


def _topk_setup_context(ctx, inputs, output):
    logits, _, temperature = inputs
    _, indices, lse = output
    ctx.save_for_backward(logits, indices, lse)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(indices)


def _topk_backward(ctx, grad_values, grad_indices, grad_lse):
    logits, indices, lse = ctx.saved_tensors
    grad = _logits_grad(logits, indices, lse, ctx.temperature, grad_values, grad_lse)
    return grad.to(logits.dtype), None, None


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, _, temperature = inputs
    _, indices, lse = output
    ctx.save_for_backward(hidden, weight, indices, lse)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(indices)


def _linear_backward(ctx, grad_values, grad_indices, grad_lse):
    hidden, weight, indices, lse = ctx.saved_tensors
    grad_logits = _logits_grad(hidden @ weight.T, indices, lse, ctx.temperature, grad_values, grad_lse)
    grad_logits = grad_logits.to(hidden.dtype)
    grad_hidden = grad_logits @ weight
    grad_weight = grad_logits.reshape(-1, weight.shape[0]).T @ hidden.reshape(-1, hidden.shape[-1])
    return grad_hidden, grad_weight, None, None


torch.library.register_autograd("torchspec::topk_logprobs", _topk_backward, setup_context=_topk_setup_context)
torch.library.register_autograd(
    "torchspec::linear_topk_logprobs", _linear_backward, setup_context=_linear_setup_context
)


#: The loss kinds of :func:`draft_topk_kl`.
DRAFT_LOSSES = ("kl", "lk_alpha", "lk_lambda")


def draft_topk_kl(
    hidden: Tensor,
    weight: Tensor,
    teacher_indices: Tensor,
    teacher_logprobs: Tensor,
    valid: Tensor | None = None,
    temperature: float = 1.0,
    loss: str = "kl",
    kl_scale: float = 1.0,
    kl_decay: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The draft's loss against a top-k teacher, fused with the draft's LM head.

    Args:
        hidden: ``[N, H]`` float32, bfloat16 or float16 (the draft's last hidden states).
        weight: ``[Vd, H]`` of the same dtype and device (the draft's LM head).
        teacher_indices: ``[N, k]`` int64 ids in the draft vocabulary, ``-1`` where the teacher's
            token is not in it.
        teacher_logprobs: ``[N, k]`` float32, the teacher's log-probabilities of those tokens (over
            its whole vocabulary: the LK losses read ``exp`` of them as probabilities, so each row's
            must sum to at most 1).
        valid: ``[N]`` bool or ``None`` (all rows valid).
        temperature: ``> 0``; the draft's logits are divided by it.
        loss: ``"kl"``, ``"lk_alpha"`` or ``"lk_lambda"`` (see below).
        kl_scale, kl_decay: lk_lambda's KL weight ``w = kl_scale * exp(-kl_decay * mean acceptance)``;
            ``0 <= kl_scale <= 1``, ``kl_decay >= 0`` (SpecForge's defaults, 1 and 1).

    With ``log q = log_softmax(hidden @ weight.T / temperature)`` (float32) and the mean taken over
    valid rows with at least one present entry (0 when no row counts):

    - ``"kl"``: the mean of ``-sum_j p[n, j] * log q[n, teacher_indices[n, j]]``, ``p`` the softmax of
      ``teacher_logprobs`` over the present entries (the KL divergence up to the teacher's entropy).
    - ``"lk_alpha"``: the mean of ``-log a[n]`` (0 for a row whose ``a`` is 0), the expected acceptance
      ``a = sum_v min(p_teacher(v), q(v))`` estimated from the top-k: the raw teacher probabilities
      ``exp(teacher_logprobs)`` of the present ids against ``q`` there, plus
      ``min(teacher tail, draft tail)`` for the mass outside the top-k (docs/ops.md says why).
    - ``"lk_lambda"``: ``w * kl + (1 - w) * (1 - mean a)``, ``w`` from the batch's mean acceptance
      and a constant of the gradient (detached, as SpecForge does).

    Returns:
        ``(loss, argmax, lse)``: ``loss`` a float32 scalar; ``argmax [N]`` int64, each row's draft
        argmax (lowest id on ties); ``lse [N]`` float32, the log-sum-exp of each row's
        ``hidden @ weight.T / temperature``.

    Differentiable with respect to ``hidden`` and ``weight`` (through ``loss``; ``argmax`` and
    ``lse`` are not differentiable). The ``[N, Vd]`` logits never exist: they are made tile by
    tile. In eager mode with a gradient wanted, the gradients are computed in the same pass as
    the loss (``draft_topk_kl_with_grad``) and scaled in the backward: three GEMMs per tile, as
    eager autograd needs, where a separate backward would make the logits again (lk_lambda makes
    them again: its weight needs every row's acceptance first). Under ``torch.compile`` the op and
    its registered backward run instead.
    """
    args = (hidden, weight, teacher_indices, teacher_logprobs, valid, temperature, loss, kl_scale, kl_decay)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad) and not torch.compiler.is_compiling():
        return _DraftTopkKLOnePass.apply(*args)
    return torch.ops.torchspec.draft_topk_kl.default(*args)[:3]


class _DraftTopkKLOnePass(torch.autograd.Function):
    """draft_topk_kl whose gradients were computed with the loss: the backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_indices, teacher_logprobs, valid, temperature, loss, kl_scale, kl_decay):
        out = torch.ops.torchspec.draft_topk_kl_with_grad.default(
            hidden, weight, teacher_indices, teacher_logprobs, valid, temperature, loss, kl_scale, kl_decay
        )
        loss_value, argmax, lse, _, grad_hidden, grad_weight = out
        ctx.mark_non_differentiable(argmax, lse)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss_value, argmax, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_argmax, grad_lse):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 9
        return grad_hidden * grad_loss, grad_weight * grad_loss, *(None,) * 7


def _check_loss_args(op: str, loss: str, kl_scale: float, kl_decay: float) -> None:
    # Mirrors the compiled check, so that torch.compile fails while tracing rather than at run time.
    if loss not in DRAFT_LOSSES:
        raise RuntimeError(f"torchspec.{op}: loss must be 'kl', 'lk_alpha' or 'lk_lambda', got '{loss}'")
    if not 0.0 <= kl_scale <= 1.0:
        raise RuntimeError(f"torchspec.{op}: kl_scale must be in [0, 1], got {kl_scale}")
    if not 0.0 <= kl_decay < float("inf"):
        raise RuntimeError(f"torchspec.{op}: kl_decay must be a finite number >= 0, got {kl_decay}")


@torch.library.register_fake("torchspec::draft_topk_kl")
def _draft_topk_kl_fake(
    hidden,
    weight,
    teacher_indices,
    teacher_logprobs,
    valid=None,
    temperature=1.0,
    loss="kl",
    kl_scale=1.0,
    kl_decay=1.0,
):
    torch._check(hidden.dim() == 2, lambda: "torchspec.draft_topk_kl: hidden must be 2-D [N, H]")
    torch._check(weight.dim() == 2, lambda: "torchspec.draft_topk_kl: weight must be 2-D [Vd, H]")
    _check_loss_args("draft_topk_kl", loss, kl_scale, kl_decay)
    n = hidden.shape[0]
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty((n,), dtype=torch.int64),
        hidden.new_empty((n,), dtype=torch.float32),
        hidden.new_empty(teacher_indices.shape, dtype=torch.float32),
    )


@torch.library.register_fake("torchspec::draft_topk_kl_with_grad")
def _draft_topk_kl_with_grad_fake(
    hidden,
    weight,
    teacher_indices,
    teacher_logprobs,
    valid=None,
    temperature=1.0,
    loss="kl",
    kl_scale=1.0,
    kl_decay=1.0,
):
    outputs = _draft_topk_kl_fake(
        hidden, weight, teacher_indices, teacher_logprobs, valid, temperature, loss, kl_scale, kl_decay
    )
    return (
        *outputs,
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("torchspec::draft_topk_kl_backward")
def _draft_topk_kl_backward_fake(
    grad_loss,
    hidden,
    weight,
    teacher_indices,
    teacher_logprobs,
    valid,
    lse,
    draft_logprobs,
    temperature,
    loss="kl",
    kl_scale=1.0,
    kl_decay=1.0,
):
    _check_loss_args("draft_topk_kl_backward", loss, kl_scale, kl_decay)
    return torch.empty_like(hidden, memory_format=torch.contiguous_format), torch.empty_like(
        weight, memory_format=torch.contiguous_format
    )


def _draft_topk_kl_setup_context(ctx, inputs, output):
    hidden, weight, teacher_indices, teacher_logprobs, valid, temperature, loss, kl_scale, kl_decay = inputs
    _, argmax, lse, draft_logprobs = output
    ctx.mark_non_differentiable(argmax, lse, draft_logprobs)
    ctx.save_for_backward(hidden, weight, teacher_indices, teacher_logprobs, valid, lse, draft_logprobs)
    ctx.args = (temperature, loss, kl_scale, kl_decay)


def _draft_topk_kl_backward(ctx, grad_loss, grad_argmax, grad_lse, grad_draft_logprobs):
    hidden, weight, teacher_indices, teacher_logprobs, valid, lse, draft_logprobs = ctx.saved_tensors
    if grad_loss is None:  # only argmax / lse / draft_logprobs were used: they carry no gradient
        return (None,) * 9
    grad_hidden, grad_weight = torch.ops.torchspec.draft_topk_kl_backward.default(
        grad_loss, hidden, weight, teacher_indices, teacher_logprobs, valid, lse, draft_logprobs, *ctx.args
    )
    return grad_hidden, grad_weight, *(None,) * 7


torch.library.register_autograd(
    "torchspec::draft_topk_kl", _draft_topk_kl_backward, setup_context=_draft_topk_kl_setup_context
)


def tree_attention(
    q: Tensor, k: Tensor, v: Tensor, prefix_lens: Tensor, parents: Tensor, scale: float | None = None
) -> Tensor:
    """Attention of the T nodes of a draft tree over their prefix and their ancestors.

    Args:
        q: ``[B, Hq, T, D]``, the queries of the T tree nodes; float32, bfloat16 or float16.
        k, v: ``[B, Hkv, S, D]``, same dtype and device. In row b, positions
            ``[0, prefix_lens[b])`` hold the prefix and position ``prefix_lens[b] + j`` holds tree
            node j (``S >= max(prefix_lens) + T``; later positions are ignored).
        prefix_lens: ``[B]`` int64 (or int32).
        parents: ``[B, T]`` int64 (or int32): ``parents[b, 0] = -1`` (node 0 is the root, the last
            committed token) and ``0 <= parents[b, j] < j`` otherwise.
        scale: the softmax scale, default ``D ** -0.5``.

    Returns:
        ``out [B, Hq, T, D]`` in q's dtype: node j attends to every prefix position and to the
        tree positions of its ancestors and itself, nothing else. Query head h reads kv head
        ``h // (Hq // Hkv)`` (GQA). Accumulation is float32; the mask is derived from ``parents``
        inside the kernel, no dense mask is built. On CUDA, ``D <= 256`` and ``Hq // Hkv <= 16``.
    """
    return torch.ops.torchspec.tree_attention.default(q, k, v, prefix_lens, parents, scale)


def verify_tree_greedy(tokens: Tensor, parents: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy verification of draft trees: the longest path the target's argmaxes agree with.

    Args:
        tokens: ``[B, T]`` int64, the tree's tokens (``tokens[b, 0]`` is the root's), in ``[0, V)``.
        parents: ``[B, T]``, as for :func:`tree_attention`.
        target_logits: ``[B, T, V]`` float32, bfloat16 or float16: the target's logits for the token
            that follows node j.

    From ``cur = 0``: ``t = argmax(target_logits[b, cur])`` (lowest id on ties, NaN above all as
    ``torch.argmax``); if a child c of cur has ``tokens[b, c] == t`` (the lowest such c), it is
    accepted and the walk continues from c; else it stops. Only the logits rows of visited nodes
    are read.

    Returns:
        ``(num_accepted [B], path [B, T], next_token [B])``, int64: ``path = [0, accepted nodes...,
        -1, ...]``, ``num_accepted`` the accepted draft nodes (the root not counted), ``next_token``
        the argmax at the last accepted node.
    """
    return torch.ops.torchspec.verify_tree_greedy.default(tokens, parents, target_logits)


def verify_tree_sampling(
    tokens: Tensor,
    parents: Tensor,
    target_logits: Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Lossless sampling verification of draft trees with deterministic (greedy-drafted) tokens.

    Arguments and outputs as :func:`verify_tree_greedy`, plus ``temperature > 0`` (temperature 0
    is an error: use :func:`verify_tree_greedy`) and an optional ``generator``.

    At node cur the target distribution is ``p = softmax(target_logits[b, cur] / temperature)``.
    The children of cur are tried in index order against a residual ``r`` (initially p): child c
    with token t is accepted with probability ``r(t) / sum(r)``; on rejection ``r(t)`` is set to 0,
    so a later sibling with the same token is never accepted. An accepted child is emitted and the
    walk continues from it; when every child is rejected, ``next_token`` is drawn from ``r /
    sum(r)`` and the walk ends. This is rejection sampling with point-mass drafts (multi-candidate
    speculative sampling), so every emitted token is distributed exactly as a sample from p at its
    node, as if the target had sampled one token at a time along the path.

    Randomness: ``u = torch.rand(B, T, dtype=float64, generator=generator)`` drawn on the
    generator's device (else target_logits') and moved to target_logits' device, so a CPU and a CUDA
    call consume the same numbers from the same generator state. Exactly B * T numbers are drawn
    per call; ``u[b, c]`` decides child c (each node is tried at most once; node 0 never is) and
    ``u[b, 0]`` draws the final token by inversion of the residual's cumulative distribution in
    token order.

    Under ``torch.compile(fullgraph=True)`` call it without a generator (dynamo does not take a
    ``torch.Generator`` here; the global RNG is used), or pass uniforms drawn outside the compiled
    region to :func:`verify_tree_sampling_uniforms`.
    """
    batch, nodes = tokens.shape[0], tokens.shape[1]
    device = generator.device if generator is not None else target_logits.device
    uniforms = torch.rand(batch, nodes, dtype=torch.float64, device=device, generator=generator)
    return verify_tree_sampling_uniforms(tokens, parents, target_logits, temperature, uniforms.to(target_logits.device))


def verify_tree_sampling_uniforms(
    tokens: Tensor, parents: Tensor, target_logits: Tensor, temperature: float, uniforms: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`verify_tree_sampling` with its uniforms given: ``[B, T]`` float64 in ``[0, 1)``,
    on target_logits' device (deterministic; used to compare devices and by tests)."""
    return torch.ops.torchspec.verify_tree_sampling.default(tokens, parents, target_logits, temperature, uniforms)


@torch.library.register_fake("torchspec::tree_attention")
def _tree_attention_fake(q, k, v, prefix_lens, parents, scale=None):
    torch._check(q.dim() == 4, lambda: "torchspec.tree_attention: q must be 4-D [B, Hq, T, D]")
    torch._check(k.dim() == 4, lambda: "torchspec.tree_attention: k must be 4-D [B, Hkv, S, D]")
    return q.new_empty(q.shape)


def _verify_fake(tokens, parents, target_logits):
    torch._check(tokens.dim() == 2, lambda: "torchspec.verify_tree: tokens must be 2-D [B, T]")
    batch, nodes = tokens.shape
    return (
        tokens.new_empty((batch,), dtype=torch.int64),
        tokens.new_empty((batch, nodes), dtype=torch.int64),
        tokens.new_empty((batch,), dtype=torch.int64),
    )


@torch.library.register_fake("torchspec::verify_tree_greedy")
def _verify_tree_greedy_fake(tokens, parents, target_logits):
    return _verify_fake(tokens, parents, target_logits)


@torch.library.register_fake("torchspec::verify_tree_sampling")
def _verify_tree_sampling_fake(tokens, parents, target_logits, temperature, uniforms):
    return _verify_fake(tokens, parents, target_logits)


def small_rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` for the few rows of a decoding step, reading each weight once.

    Args:
        x: ``[..., in]`` float32 or bfloat16; a few rows (1 to 8 is what it is for: any count works).
        weight: ``[out, in]`` of x's dtype (or bfloat16 for a float32 x: half the bytes read) and
            device; its rows may be strided.
        bias: ``[out]`` of x's dtype, or None.

    Returns:
        ``[..., out]`` in x's dtype, accumulated in float32. On the CPU a kernel streams each weight
        row once past up to four rows of x (more rows in groups, a block of weight rows at a time,
        the block kept in cache); on CUDA it is ``torch.nn.functional.linear``. No gradient: this is
        for decoding (``torchspec_ext.small_rows`` chooses it where it is measured to be faster).
    """
    return torch.ops.torchspec.small_rows_linear.default(x, weight, bias)


@torch.library.register_fake("torchspec::small_rows_linear")
def _small_rows_linear_fake(x, weight, bias=None):
    torch._check(weight.dim() == 2, lambda: "torchspec.small_rows_linear: weight must be 2-D [out, in]")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
