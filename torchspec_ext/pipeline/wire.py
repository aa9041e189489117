"""Packing of a batch (a dict of tensors) into one contiguous uint8 buffer and back.

The header format is the compiled one (csrc/pipeline/wire.h), shared with the C++ benchmark;
here the tensors' bytes are copied with torch, so packing works for CPU and CUDA tensors alike.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from torchspec_ext import _C
from torchspec_ext.pipeline.errors import HeaderMismatch

__all__ = ["DTYPE_CODES", "host_to_device", "pack", "unpack"]

#: torch dtype -> wire code (csrc/pipeline/wire.h, WireDtype).
DTYPE_CODES = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.float64: 3,
    torch.int64: 4,
    torch.int32: 5,
    torch.int16: 6,
    torch.int8: 7,
    torch.uint8: 8,
    torch.bool: 9,
}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def pack(batch: dict[str, Tensor], seq: int, alloc: Callable[[int], Tensor]) -> tuple[Tensor, int]:
    """``(buffer, header_bytes)``: the batch as header + tensors in ``alloc(total_bytes)``, a 1-D
    uint8 tensor of exactly ``total_bytes`` on the channel's device (tensors are copied there)."""
    if not isinstance(batch, dict) or not batch:
        raise TypeError(f"pipeline: a batch is a non-empty dict of str -> Tensor, got {type(batch).__name__}")
    specs = []
    for name, t in batch.items():
        if not isinstance(name, str) or not isinstance(t, Tensor):
            raise TypeError(f"pipeline: a batch maps str -> Tensor, got {name!r} -> {type(t).__name__}")
        if t.dtype not in DTYPE_CODES:
            supported = ", ".join(str(d).replace("torch.", "") for d in DTYPE_CODES)
            raise TypeError(f"pipeline: tensor '{name}' has dtype {t.dtype}; supported: {supported}")
        specs.append((name, DTYPE_CODES[t.dtype], list(t.shape)))
    header, offsets, total = _C.pipeline_plan(seq, specs)
    buffer = alloc(total)
    buffer[: len(header)].copy_(host_to_device(torch.frombuffer(bytearray(header), dtype=torch.uint8), buffer.device))
    for t, offset in zip(batch.values(), offsets):
        if t.numel():
            _view(buffer, offset, t.dtype, t.shape).copy_(t)
    return buffer, len(header)


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (CPU) on ``device`` without making the host wait for the work queued on the stream: a
    plain copy from pageable memory would synchronise it, so send() could not return before the
    producer's kernels finished. Pinned memory is reused by torch only after the copy ran."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def unpack(buffer: Tensor, header_bytes: int) -> tuple[int, dict[str, Tensor]]:
    """``(seq, batch)`` from a received buffer; the tensors are views into ``buffer`` (no copy)."""
    header = buffer[:header_bytes]
    try:
        seq, total, entries = _C.pipeline_decode(header if header.device.type == "cpu" else header.cpu())
    except _C.PipelineHeaderError as exc:
        raise HeaderMismatch(str(exc)) from None
    if total != buffer.numel():
        raise HeaderMismatch(f"pipeline header: says {total} bytes, the message had {buffer.numel()}")
    batch = {name: _view(buffer, offset, _CODE_DTYPES[code], shape) for name, code, shape, offset in entries}
    return seq, batch


def _view(buffer: Tensor, offset: int, dtype: torch.dtype, shape) -> Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    return buffer[offset : offset + nbytes].view(dtype).view(shape)
