"""The wire format: a batch (a dict of tensors) as one contiguous uint8 buffer and back.

The header format is the compiled one (csrc/pipeline/wire.h), shared with the C++ benchmark;
here the tensors' bytes are copied with torch, so packing works for CPU and CUDA tensors alike.
The receiver always gets the packed layout; :func:`pack` builds it on the sender (NCCL), while
:func:`body_messages` / :func:`body_receives` carry it as a few messages without packing (gloo),
after the fixed-size :func:`preamble`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import torch
from torch import Tensor

from torchspec_ext import _C
from torchspec_ext.pipeline.errors import HeaderMismatch

__all__ = [
    "DTYPE_CODES",
    "PREAMBLE_BYTES",
    "ZERO_COPY_BYTES",
    "body_messages",
    "body_receives",
    "bytes_tensor",
    "decode",
    "entry_bytes",
    "header_fits_inline",
    "host_to_device",
    "pack",
    "plan",
    "preamble",
    "read_preamble",
    "split_body",
    "unpack",
]

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


def plan(batch: dict[str, Tensor], seq: int) -> tuple[bytes, list[int], int]:
    """``(header, offsets, total_bytes)`` of ``batch`` packed as batch number ``seq``: the
    header (csrc/pipeline/wire.h), each tensor's offset in the packed buffer and its size."""
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
    return bytes(header), offsets, total


def pack(batch: dict[str, Tensor], seq: int, alloc: Callable[[int], Tensor]) -> tuple[Tensor, int]:
    """``(buffer, header_bytes)``: the batch as header + tensors in ``alloc(total_bytes)``, a 1-D
    uint8 tensor of exactly ``total_bytes`` on the channel's device (tensors are copied there)."""
    header, offsets, total = plan(batch, seq)
    buffer = alloc(total)
    buffer[: len(header)].copy_(host_to_device(bytes_tensor(header), buffer.device))
    for t, offset in zip(batch.values(), offsets):
        if t.numel():
            _view(buffer, offset, t.dtype, t.shape).copy_(t)
    return buffer, len(header)


#: From this size up a tensor travels from its own memory as a message of its own (gloo); the
#: smaller ones, which the packed layout puts first and back to back (csrc/pipeline/wire.h),
#: travel together as one message: on a CPU a message costs about as much as copying a megabyte,
#: so a batch is a few large messages whatever its number of tensors.
ZERO_COPY_BYTES = _C.pipeline_small_bytes


def split_body(spans: list[tuple[int, int]]) -> tuple[tuple[int, int] | None, list[int]]:
    """``(small, large)``: the ``(start, end)`` bytes of the packed buffer that hold the small
    tensors (None if there are none), and the indices of the tensors that travel alone.
    ``spans``: each tensor's ``(offset, nbytes)``; sender and receiver both take them from the header."""
    small = [(offset, offset + nbytes) for offset, nbytes in spans if 0 < nbytes < ZERO_COPY_BYTES]
    large = [i for i, (_, nbytes) in enumerate(spans) if nbytes >= ZERO_COPY_BYTES]
    region = (min(s for s, _ in small), max(e for _, e in small)) if small else None
    return region, large


def body_messages(
    batch: dict[str, Tensor], offsets: list[int], device: torch.device, alloc: Callable[[int], Tensor]
) -> tuple[list[Tensor], Tensor | None]:
    """``(messages, small)``: the body as messages on the sending side: the small tensors' region
    of the packed buffer, copied into ``alloc(bytes)`` (``small``, None if there are none), then
    each large tensor's own bytes (no copy when it is contiguous and on ``device``)."""
    tensors = list(batch.values())
    spans = [(offset, t.numel() * t.element_size()) for t, offset in zip(tensors, offsets)]
    region, large = split_body(spans)
    messages, together = [], None
    if region is not None:
        start, end = region
        together = alloc(end - start)
        for t, (offset, nbytes) in zip(tensors, spans):
            if 0 < nbytes < ZERO_COPY_BYTES:
                _view(together, offset - start, t.dtype, t.shape).copy_(t)
        messages.append(together)
    for i in large:
        t = tensors[i].to(device).contiguous()  # both no-ops for a contiguous tensor already there
        messages.append(t.reshape(-1).view(torch.uint8))
    return messages, together


def body_receives(buffer: Tensor, spans: list[tuple[int, int]]) -> list[Tensor]:
    """The receiving side of :func:`body_messages`: the slices of ``buffer`` (the packed layout)
    that its messages arrive in, so every tensor lands in its place without a copy."""
    region, large = split_body(spans)
    targets = [buffer[region[0] : region[1]]] if region is not None else []
    return targets + [buffer[spans[i][0] : spans[i][0] + spans[i][1]] for i in large]


#: The fixed-size first message of every batch: int64 total_bytes, int64 header_bytes, then the
#: header itself when it fits (a batch of a few tensors); total_bytes = -1 ends the stream.
PREAMBLE_BYTES = 2048
_INLINE_HEADER = PREAMBLE_BYTES - 16


def preamble(total: int, header: bytes | int) -> Tensor:
    """The preamble (CPU) of a batch of ``total`` bytes: with the header inline when ``header`` is
    the header's bytes and they fit, else only its size (``header`` an int, or too long)."""
    pre = bytearray(PREAMBLE_BYTES)
    size = header if isinstance(header, int) else len(header)
    struct.pack_into("<qq", pre, 0, total, size)
    if not isinstance(header, int) and size <= _INLINE_HEADER:
        pre[16 : 16 + size] = header
    return torch.frombuffer(pre, dtype=torch.uint8)


def read_preamble(pre: Tensor) -> tuple[int, int, Tensor | None]:
    """``(total_bytes, header_bytes, header or None)`` of a received preamble (on any device);
    the header is there when the sender put it inline (see :func:`preamble`)."""
    pre = pre.cpu()
    total, header_bytes = struct.unpack("<qq", pre[:16].numpy().tobytes())
    inline = pre[16 : 16 + header_bytes] if 0 < header_bytes <= _INLINE_HEADER else None
    return total, header_bytes, inline


def header_fits_inline(header_bytes: int) -> bool:
    return header_bytes <= _INLINE_HEADER


def bytes_tensor(data: bytes) -> Tensor:
    """``data`` as a 1-D uint8 CPU tensor (a copy)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (CPU) on ``device`` without making the host wait for the work queued on the stream: a
    plain copy from pageable memory would synchronise it, so send() could not return before the
    producer's kernels finished. Pinned memory is reused by torch only after the copy ran."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def decode(header: Tensor) -> tuple[int, int, list]:
    """``(seq, total_bytes, entries)`` of a header; entries are ``(name, dtype code, shape, offset)``."""
    try:
        return _C.pipeline_decode(header if header.device.type == "cpu" else header.cpu())
    except _C.PipelineHeaderError as exc:
        raise HeaderMismatch(str(exc)) from None


def entry_bytes(code: int, shape) -> int:
    return math.prod(shape) * _CODE_DTYPES[code].itemsize


def unpack(
    buffer: Tensor, header_bytes: int, decoded: tuple[int, int, list] | None = None
) -> tuple[int, dict[str, Tensor]]:
    """``(seq, batch)`` from a received buffer; the tensors are views into ``buffer`` (no copy).
    ``decoded``: :func:`decode` of the buffer's header, when the caller already has it."""
    seq, total, entries = decoded if decoded is not None else decode(buffer[:header_bytes])
    if total != buffer.numel():
        raise HeaderMismatch(f"pipeline header: says {total} bytes, the message had {buffer.numel()}")
    batch = {name: _view(buffer, offset, _CODE_DTYPES[code], shape) for name, code, shape, offset in entries}
    return seq, batch


def _view(buffer: Tensor, offset: int, dtype: torch.dtype, shape) -> Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    return buffer[offset : offset + nbytes].view(dtype).view(shape)
