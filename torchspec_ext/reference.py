"""Plain-PyTorch versions of the ops in :mod:`torchspec_ext.ops`: the references and the ``--reference-ops`` baseline.

Each function has the signature and the return conventions of the op of the same name and no
custom op in it: the tests call them on float64 inputs as the references the ops are checked
against, and the training loop's ``--reference-ops`` calls :func:`linear_topk_logprobs` and
:func:`draft_topk_kl` on its own inputs as the eager baseline. They work in the dtype given
(float32 at least where the op accumulates in float32; float64 stays float64) and materialise
what the ops avoid: the ``[..., V]`` logits, a dense tree mask, Python walks of the trees.
"""

import torch
from torch import Tensor

__all__ = [
    "topk_logprobs",
    "linear_topk_logprobs",
    "draft_topk_kl",
    "tree_attention",
    "verify_tree_greedy",
    "verify_tree_sampling",
    "verify_tree_sampling_uniforms",
]


def _at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or as it is when wider (float64: the tests' references)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def topk_logprobs(logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(logprobs, indices, lse)`` of ``logits / temperature`` by a stable descending sort (lower index first)."""
    x = _at_least_float32(logits) / temperature
    lse = torch.logsumexp(x, dim=-1)
    # torch.topk on a margin of extra candidates, then a stable sort of those by value: the same
    # order as a stable sort of the whole row unless a tie spans the margin (then sort it all).
    margin = min(x.shape[-1], k + 64)
    cand_values, cand_indices = torch.topk(x, margin, dim=-1)
    last, kth = cand_values[..., -1], cand_values[..., k - 1]
    # NaNs tie with each other (torch.topk ranks them first, in no particular index order).
    if margin < x.shape[-1] and ((last == kth) | (last.isnan() & kth.isnan())).any():
        order = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
    else:
        by_index = cand_indices.sort(dim=-1).values
        order = by_index.gather(-1, torch.sort(x.gather(-1, by_index), dim=-1, descending=True, stable=True).indices)
        order = order[..., :k]
    return x.gather(-1, order) - lse.unsqueeze(-1), order, lse


def linear_topk_logprobs(
    hidden: Tensor, weight: Tensor, k: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`topk_logprobs` of the materialised ``hidden @ weight.T`` (in the input dtype)."""
    return topk_logprobs(hidden @ weight.T, k, temperature)


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
    """``(loss, argmax, lse)`` from the materialised ``[N, Vd]`` logits; ``loss`` differentiable by autograd.

    The LK losses from dense ``[N, Vd]`` teacher probabilities (``exp(teacher_logprobs)`` scattered to
    their ids, repeats added) and the draft's tail mass summed over the ids outside the top-k.
    """
    if loss not in ("kl", "lk_alpha", "lk_lambda"):
        raise ValueError(f"loss must be 'kl', 'lk_alpha' or 'lk_lambda', got {loss!r}")
    if not (0.0 <= kl_scale <= 1.0 and 0.0 <= kl_decay < float("inf")):
        raise ValueError(f"need 0 <= kl_scale <= 1 and a finite kl_decay >= 0, got {kl_scale} and {kl_decay}")
    logits = _at_least_float32(hidden @ weight.T) / temperature
    logq = torch.log_softmax(logits, dim=-1)
    present = teacher_indices >= 0
    counted = present.any(-1)
    if valid is not None:
        counted = counted & valid
    p = torch.softmax(teacher_logprobs.to(logq.dtype).masked_fill(~present, float("-inf")), dim=-1)
    p = torch.where(present & counted[:, None], p, 0.0)  # rows with no present entry: NaN -> 0
    per_row = -(p * logq.gather(1, teacher_indices.clamp_min(0))).sum(-1)
    count = counted.sum().clamp_min(1)
    kl = torch.where(counted, per_row, 0.0).sum() / count
    logits = logits.detach()
    if loss == "kl":
        return kl, logits.argmax(-1), torch.logsumexp(logits, dim=-1)
    accept = _expected_acceptance(logq.exp(), teacher_indices, teacher_logprobs.to(logq.dtype))
    if loss == "lk_alpha":
        # -log a, and 0 (no gradient) where a == 0, as SpecForge masks log 0 out.
        per_row = torch.where(accept > 0, -torch.log(torch.where(accept > 0, accept, 1.0)), 0.0)
        value = torch.where(counted, per_row, 0.0).sum() / count
    else:
        mean_accept = torch.where(counted, accept, 0.0).sum() / count
        w = kl_scale * torch.exp(-kl_decay * mean_accept.detach())  # a constant of the gradient
        value = w * kl + (1 - w) * (1 - mean_accept)
    return value, logits.argmax(-1), torch.logsumexp(logits, dim=-1)


def _expected_acceptance(q: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """``[N]``: sum over the draft vocabulary of ``min(p, q)`` for the teacher's top-k ids, plus
    ``min(teacher tail, draft tail)``; a tie counts as the teacher's value (no gradient)."""
    present = teacher_indices >= 0
    ids = teacher_indices.clamp_min(0)
    p = torch.zeros_like(q).scatter_add(1, ids, torch.where(present, teacher_logprobs.exp(), 0.0))
    in_topk = torch.zeros_like(q).scatter_add(1, ids, present.to(q.dtype)) > 0
    q_tail = torch.where(in_topk, 0.0, q).sum(-1)
    p_tail = (1 - teacher_logprobs.exp().sum(-1)).clamp_min(0)
    return torch.where(q < p, q, p).sum(-1) + torch.where(q_tail < p_tail, q_tail, p_tail)


def _tree_mask(prefix_lens: Tensor, parents: Tensor, seq: int) -> Tensor:
    """``[B, T, S]`` bool: node j sees the prefix and the tree positions of its ancestors and itself."""
    batch, nodes = parents.shape
    rows = torch.arange(batch, device=parents.device)
    ancestors = torch.eye(nodes, dtype=torch.bool, device=parents.device).repeat(batch, 1, 1)
    for j in range(1, nodes):  # parents[:, j] < j: the parent's row is complete already
        ancestors[:, j] |= ancestors[rows, parents[:, j]]
    node = torch.arange(seq, device=parents.device) - prefix_lens.to(parents.device)[:, None]  # [B, S]
    in_tree = (node >= 0) & (node < nodes)
    sees = ancestors.gather(2, node.clamp(0, nodes - 1)[:, None, :].expand(batch, nodes, seq))
    return (node < 0)[:, None, :] | (in_tree[:, None, :] & sees)


def tree_attention(
    q: Tensor, k: Tensor, v: Tensor, prefix_lens: Tensor, parents: Tensor, scale: float | None = None
) -> Tensor:
    """Eager ``softmax(q k^T * scale) v`` in q's dtype under the dense mask built from ``parents``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = _tree_mask(prefix_lens, parents, k.shape[2]).to(q.device)
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _verdicts(rows, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(num_accepted [B], path [B, T], next_token [B])`` int64 on tokens' device from per-row walks."""
    num = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    path = torch.tensor([r[1] for r in rows], dtype=torch.int64).reshape(tokens.shape)
    nxt = torch.tensor([r[2] for r in rows], dtype=torch.int64)
    return num.to(tokens.device), path.to(tokens.device), nxt.to(tokens.device)


def _greedy_walk(tokens, parents, argmax):
    """One row (lists): from the root, accept the lowest child holding the argmax until none does."""
    nodes = len(tokens)
    path, cur = [0], 0
    while True:
        t = argmax[cur]
        child = next((c for c in range(cur + 1, nodes) if parents[c] == cur and tokens[c] == t), None)
        if child is None:
            return len(path) - 1, path + [-1] * (nodes - len(path)), t
        path.append(child)
        cur = child


def verify_tree_greedy(tokens: Tensor, parents: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The greedy walk in Python over ``torch.argmax`` of every node (lowest id on ties, NaN first)."""
    argmax = target_logits.argmax(-1).tolist()
    rows = [_greedy_walk(*row) for row in zip(tokens.tolist(), parents.tolist(), argmax)]
    return _verdicts(rows, tokens)


def _accepts(u: float, residual: float, p: float) -> bool:
    """The acceptance rule: a child whose token has probability ``p`` is taken when ``u < p / residual``."""
    return u * residual < p


def _sampling_walk(tokens, parents, probs: Tensor, u):
    """One row (tokens, parents, uniforms as lists; probs ``[T, V]``, only the visited nodes' rows read)."""
    nodes = len(tokens)
    path, cur = [0], 0
    while True:
        p = probs[cur].tolist()
        residual, rejected, accepted = 1.0, set(), None
        for c in range(cur + 1, nodes):
            if parents[c] != cur or tokens[c] in rejected:
                continue
            pt = p[tokens[c]]
            if _accepts(u[c], residual, pt):
                accepted = c
                break
            residual -= pt
            rejected.add(tokens[c])
        if accepted is not None:
            path.append(accepted)
            cur = accepted
            continue
        # Every child rejected: invert the residual's cumulative distribution in token order at u[0].
        goal, cum, last = u[0] * residual, 0.0, 0
        for t, pt in enumerate(p):
            if pt <= 0.0 or t in rejected:
                continue
            cum += pt
            last = t
            if cum > goal:
                break
        return len(path) - 1, path + [-1] * (nodes - len(path)), last


def verify_tree_sampling_uniforms(
    tokens: Tensor, parents: Tensor, target_logits: Tensor, temperature: float, uniforms: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The sampling walk in Python with the given ``[B, T]`` uniforms, ``p = softmax(target_logits / temperature)``."""
    probs = torch.softmax(_at_least_float32(target_logits) / temperature, dim=-1)
    rows = [_sampling_walk(*row) for row in zip(tokens.tolist(), parents.tolist(), probs.unbind(0), uniforms.tolist())]
    return _verdicts(rows, tokens)


def verify_tree_sampling(
    tokens: Tensor,
    parents: Tensor,
    target_logits: Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`verify_tree_sampling_uniforms` after the op's draw (``torch.rand(B, T, float64)``, generator's device)."""
    device = generator.device if generator is not None else target_logits.device
    uniforms = torch.rand(tokens.shape, dtype=torch.float64, device=device, generator=generator)
    return verify_tree_sampling_uniforms(tokens, parents, target_logits, temperature, uniforms)
