"""Linear layers that stay fast for the few rows of a verification forward.

Decoding multiplies one row (plain decoding) or a handful (a verification forward over a chain or a
tree: 2 to 17 nodes here) by every weight of the target, so it is bound by reading the weights.
PyTorch's usual ``x @ W.T`` does not read them at the memory's speed for those counts on every CPU
BLAS: on this project's machine with PyTorch's MKL, one to three rows through the LM head read its
weight at a third of that speed, and 2 or 3 rows take longer than 16 (scripts/measure_small_rows.py).
Two other ways compute the same product: ``(W @ x.T).T`` (one row padded to two), which takes
another BLAS path, and the ``small_rows_linear`` kernel of this package, which streams each weight
row once past the rows of x (float32 and bfloat16 weights). Which is fastest depends on the machine
and the shape, so it is measured, once per weight shape, dtype and row count, the first time it is
needed, and the fastest way is kept.
"""

from __future__ import annotations

import time

import torch

from torchspec_ext.ops import small_rows_linear

# The row counts that are measured; a count between two of them takes the way of the next one up,
# and more rows than the last take the usual way.
MEASURED_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32)
_MEASURED_FOR = [next(m for m in MEASURED_ROWS if m >= rows) for rows in range(MEASURED_ROWS[-1] + 1)]
MEASURED_FROM_BYTES = 1 << 18  # a smaller weight costs microseconds either way: the usual way, unmeasured
OUT_OF_CACHE_BYTES, MAX_COPIES = 64 << 20, 160  # twice the last-level cache of the machine measured (32 MiB)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the small_rows_linear kernel reads
# (out, in, dtype, bfloat16_copy, rows) -> the way that won: "usual", "swapped", "kernel" or "bfloat16 kernel"
_fastest: dict[tuple, str] = {}


def best_seconds(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` calls of ``fn`` after one warm-up call, in seconds."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return min(times)


def _swapped(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for ``x [rows, in]`` as ``(weight @ x.T).T``; one row is padded to two (the
    matrix-vector path is the slow one)."""
    rows = x.shape[0]
    if rows == 1:
        x = torch.cat([x, torch.zeros_like(x)])
    return torch.mm(weight, x.t()).t()[:rows]


def _apply(way: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, half=None) -> torch.Tensor:
    """``x [rows, in] @ weight.T + bias`` the given way (``half``: weight's bfloat16 copy, for that way)."""
    if way == "kernel":
        return small_rows_linear(x, weight, bias)
    if way == "bfloat16 kernel":
        return small_rows_linear(x, half, bias)
    if way == "swapped":
        y = _swapped(weight, x)
        return y if bias is None else y + bias
    return torch.nn.functional.linear(x, weight, bias)


def _fastest_way(weight: torch.Tensor, rows: int, bfloat16_copy: bool) -> str:
    key = (*weight.shape, weight.dtype, bfloat16_copy)
    rows = _MEASURED_FOR[rows]
    if (*key, rows) not in _fastest:
        _fastest.update({(*key, r): way for r, way in _measure(weight, bfloat16_copy).items()})
    return _fastest[(*key, rows)]


def _measure(weight: torch.Tensor, bfloat16_copy: bool) -> dict[int, str]:
    """For each of MEASURED_ROWS, the way that is clearly fastest for ``weight``'s shape and dtype
    (with ``bfloat16_copy``, the kernel over a bfloat16 copy of a float32 weight is a way too)."""
    size = weight.numel() * weight.element_size()
    if size < MEASURED_FROM_BYTES:
        return dict.fromkeys(MEASURED_ROWS, "usual")
    ways = ["usual", "swapped"] + (["kernel"] if weight.dtype in KERNEL_DTYPES else [])
    if bfloat16_copy and weight.dtype == torch.float32 and torch.bfloat16 in KERNEL_DTYPES:
        ways.append("bfloat16 kernel")
    # In a forward each weight comes from memory, not the cache: time every way over copies of the
    # weight that together outgrow the caches, as a forward's layers do.
    fastest = {}
    with torch.no_grad():
        copies = [weight] + [weight.clone() for _ in range(min(MAX_COPIES, OUT_OF_CACHE_BYTES // size))]
        halves = [w.to(torch.bfloat16) for w in copies] if "bfloat16 kernel" in ways else [None] * len(copies)
        for rows in MEASURED_ROWS:
            x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
            seconds = {
                way: best_seconds(lambda way=way, x=x: [_apply(way, x, w, None, h) for w, h in zip(copies, halves)])
                for way in ways
            }
            best = min(seconds, key=seconds.get)
            fastest[rows] = best if seconds[best] < 0.9 * seconds["usual"] else "usual"  # a clear win only
    return fastest


class SmallRowsLinear(torch.nn.Linear):
    """``nn.Linear`` that computes 1-32 rows on the CPU the fastest of the three ways (four with
    ``bfloat16_copy``: the kernel over a bfloat16 copy of the weight, made again whenever the weight
    changes; for a draft, whose proposals the target's verification checks, never for the target)."""

    bfloat16_copy = False

    def _half(self) -> torch.Tensor:
        stamp = (self.weight.data_ptr(), self.weight._version)  # an in-place update bumps the version
        if getattr(self, "_half_stamp", None) != stamp:
            self._half_weight, self._half_stamp = self.weight.detach().to(torch.bfloat16), stamp
        return self._half_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        w = self.weight
        # The kernel has no gradient: anything autograd tracks takes the usual way.
        tracked = torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)
        if not 1 <= rows <= MEASURED_ROWS[-1] or w.device.type != "cpu" or tracked:
            return super().forward(x)
        way = _fastest_way(w, rows, self.bfloat16_copy)
        if way == "usual":
            return super().forward(x)
        half = self._half() if way == "bfloat16 kernel" else None
        return _apply(way, x.reshape(rows, -1), w, self.bias, half).reshape(*x.shape[:-1], w.shape[0])


def enable_small_rows(model: torch.nn.Module, bfloat16_copy: bool = False) -> None:
    """Makes every ``nn.Linear`` of ``model`` (a target loaded for decoding) a :class:`SmallRowsLinear`:
    same weights, same results to float rounding; anything autograd tracks and other devices take the
    usual way. ``bfloat16_copy`` (a draft only: its results change by the weights' rounding) lets them
    also read a bfloat16 copy of float32 weights where that is measured faster. Idempotent."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = SmallRowsLinear
        if type(module) is SmallRowsLinear and bfloat16_copy:
            module.bfloat16_copy = True
