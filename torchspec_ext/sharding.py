"""A target held by a group of ranks: torch's FSDP2 (``fully_shard``) over the group.

Every rank of the group keeps 1/S of each weight (embeddings, each decoder layer, the LM head)
and runs its own batches; a layer's weights are gathered from the group just before the layer
runs and freed after it. FSDP2 was chosen over transformers' tensor parallelism because it runs
on gloo (CPU) and NCCL alike, shards any model whatever its head counts (tensor parallelism
needs S to divide the attention and key/value heads: SmolLM2's 9 and 3 allow only 1 and 3),
and leaves each rank a whole forward pass, so every shard rank is a teacher that sends its own
batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of ``model``'s weights this rank holds, bytes of all of them): for a sharded model
    its shards and the whole model's."""
    held = whole = 0
    for p in model.parameters():
        held += (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        whole += p.numel() * p.element_size()
    return held, whole


def shard_target(target, group, device: torch.device) -> None:
    """Shards ``target`` (a transformers causal LM) over the ranks of ``group``, in place: each
    decoder layer, then the rest of the base model (embeddings, final norm), then the LM head,
    each a unit gathered for its own forward. A head tied to the embeddings gets its own copy
    first (it is gathered on its own, as a weight, not run as a module)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, device.type)
    head = target.get_output_embeddings()
    if head.weight is target.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    for layer in target.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(target.model, mesh=mesh)
    fully_shard(head, mesh=mesh)


def is_sharded(target) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(target.model, FSDPModule)


def hidden_states(base_model, input_ids: Tensor) -> tuple[list[Tensor], Tensor]:
    """(hidden states, last hidden state) as ``base_model(input_ids, output_hidden_states=True)``
    gives them: the input of every decoder layer, then the normed output. Recorded by hooks:
    transformers records them by the model's class name, which FSDP2 changes."""
    inputs: list[Tensor] = []

    def record(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])

    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in base_model.layers]
    try:
        final = base_model(input_ids).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    return [*inputs, final], final


@contextlib.contextmanager
def gathered_weight(module) -> Iterator[Tensor]:
    """``module.weight`` whole: for a sharded module gathered from the group for the block, then
    freed (the LM head, used as a weight by linear_topk_logprobs and never run as a module)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield module.weight
        return
    module.unshard()
    try:
        yield module.weight
    finally:
        module.reshard()
