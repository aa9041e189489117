"""A target held by a group of ranks: torch's FSDP2 (``fully_shard``) over the group.

Every rank of the group keeps 1/S of each weight (embeddings, each decoder layer, the LM head)
and runs its own batches; a layer's weights are gathered from the group just before the layer
runs and freed after it. FSDP2 was chosen over transformers' tensor parallelism because it runs
on gloo (CPU) and NCCL alike, shards any model whatever its head counts (tensor parallelism
needs S to divide the attention and key/value heads: SmolLM2's 9 and 3 allow only 1 and 3),
and leaves each rank a whole forward pass, so every shard rank is a teacher that sends its own
batches.

Loading is sharded too (:func:`load_sharded_target`): the target is built without weights (on
the meta device), sharded, and each rank reads only its slices of the safetensors files with
torch.distributed.checkpoint's Hugging Face reader, so no rank ever holds the whole target.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

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
    """Shards ``target`` (a transformers causal LM) over the ranks of ``group``, in place: the
    embeddings, each decoder layer, then the rest of the base model (the final norm), then the LM
    head, each a unit gathered for its own forward. A head tied to the embeddings gets its own copy
    first (it is gathered on its own, as a weight, not run as a module)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, device.type)
    head = target.get_output_embeddings()
    if head.weight is target.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    # Resharded after every forward, the root too (FSDP2 keeps a root's weights gathered for the
    # backward it expects; a teacher never runs one). The embedding is a unit of its own, gathered
    # for the lookup only rather than through all the layers' forward as part of the root.
    fully_shard(target.get_input_embeddings(), mesh=mesh, reshard_after_forward=True)
    for layer in target.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(target.model, mesh=mesh, reshard_after_forward=True)
    fully_shard(head, mesh=mesh, reshard_after_forward=True)


def load_sharded_target(target, files: list[Path], group, device: torch.device) -> dict:
    """Shards an :func:`torchspec_ext.target.empty_target` over ``group`` (:func:`shard_target`) and
    fills this rank's shards from the safetensors ``files`` (checked by
    ``torchspec_ext.target.weight_files``): every rank reads just its rows of each tensor. A tied
    LM head is read once, as the embedding, and its shard copied. A collective of the group.
    Returns what was read: ``read_bytes``, ``load_s``, and the process's resident set before
    (``rss_before_bytes``, None where /proc is not) and its peak after (``peak_rss_bytes``)."""
    import torch.distributed.checkpoint as dcp

    from torchspec_ext.target import checkpoint_names, source_names

    begin, rss_before = time.monotonic(), _rss_bytes()
    if device.type == "cpu":
        _return_freed_blocks()
    names = checkpoint_names(files)
    sources = source_names(target, names)  # before shard_target unties a tied head
    buffers = {name: b.detach().clone() for name, b in target.named_buffers()}
    shard_target(target, group, device)
    target.to_empty(device=device)  # allocates this rank's shards; buffers come back below
    with torch.no_grad():
        for name, b in buffers.items():
            target.get_buffer(name).copy_(b)
        wanted, copies = {}, []
        for name, p in target.named_parameters():
            if sources[name] in wanted:  # the second of a tied pair, now a parameter of its own
                copies.append((p, wanted[sources[name]]))
            else:
                wanted[sources[name]] = p
        reader = _slice_reader(str(files[0].parent))
        dcp.load({key: p.detach() for key, p in wanted.items()}, storage_reader=reader, process_group=group)
        for p, source in copies:
            p.to_local().copy_(source.to_local())
    target.eval()
    return {
        "read_bytes": reader.read_bytes,
        "load_s": time.monotonic() - begin,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _return_freed_blocks() -> None:
    """On the CPU (glibc): malloc's mmap threshold fixed at 1 MiB. Each forward gathers and frees
    every unit's weights; by default glibc raises the threshold to the size of each large block
    freed (up to 32 MiB), then keeps such blocks in its heaps for reuse, fragmented over gloo's
    threads: a CPU teacher's resident set grew by 0.7-1.1 GB over its first dozen batches (the
    default target over 3 ranks). Fixed, blocks of 1 MiB and more go back to the system when freed."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError, TypeError):  # not glibc: its allocator behaves otherwise
        pass


READ_CHUNK_BYTES = 64 << 20  # the most a rank reads at once: the bound on what reading adds to its shards


def _row_chunks(offsets, lengths, row_bytes: int) -> Iterator[tuple[tuple, tuple]]:
    """(index into the stored tensor, index into the shard) of row blocks of at most
    READ_CHUNK_BYTES covering the slice at ``offsets`` of ``lengths``; one pair for a 0-d tensor."""
    if not lengths:
        yield (), ()
        return
    rest = tuple(slice(o, o + n) for o, n in zip(offsets[1:], lengths[1:]))
    step = max(1, READ_CHUNK_BYTES // max(1, row_bytes))
    for row in range(0, lengths[0], step):
        rows = min(step, lengths[0] - row)
        yield (slice(offsets[0] + row, offsets[0] + row + rows), *rest), (slice(row, row + rows),)


def _slice_reader(path: str):
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    class SliceReader(HuggingFaceStorageReader):
        """torch.distributed.checkpoint's reader of Hugging Face safetensors, reading each slice in
        blocks of rows of at most READ_CHUNK_BYTES and opening the file for each block: safetensors
        maps the file into memory, and the pages a rank touched stay in its resident set until the
        file is closed, so a file kept open would add the rank's whole share of it again, and a
        slice read in one piece its size twice (the read tensor, the mapped pages) before the copy
        into the shard. Counts the bytes read."""

        read_bytes = 0

        def read_data(self, plan, planner):
            from safetensors import safe_open

            for item in plan.items:
                info = self.storage_data[item.storage_index]
                name, lengths = item.storage_index.fqn, list(item.lengths)
                into = planner.resolve_tensor(item).detach()
                if list(into.shape) != lengths:
                    raise ValueError(
                        f"{info.relative_path}: {name}: a slice of {lengths} for a shard of {list(into.shape)}"
                    )
                row_bytes = math.prod(lengths[1:]) * info.dtype.itemsize
                for source, target in _row_chunks(list(item.storage_offsets), lengths, row_bytes):
                    with safe_open(info.relative_path, framework="pt") as f:
                        data = f.get_slice(name)[source]
                    into[target].copy_(data)
                    self.read_bytes += data.numel() * data.element_size()
                planner.commit_tensor(item, into)
            done = torch.futures.Future()
            done.set_result(None)
            return done

    return SliceReader(path)


@contextlib.contextmanager
def weightless() -> Iterator[None]:
    """Modules built in the block get their parameters on the meta device (no memory) and their
    buffers as usual: a teacher rank's draft, of which it uses only the vocabulary maps (buffers)
    and the feature layers. Copies into those parameters (a draft's initialisation) do nothing."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        yield


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
