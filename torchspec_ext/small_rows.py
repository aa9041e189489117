"""Linear layers that stay fast for the few rows of a verification forward.

Decoding multiplies one row (plain decoding) or a handful (a verification forward over a chain or a
pruned tree: 2 to 8 nodes) by every weight of the target. On some CPU BLAS builds the usual
``x @ W.T`` is slow for exactly those counts: on this project's AVX2 machine with PyTorch's MKL, one
to three rows through the LM head read its weight at a third of the memory's speed, and 2 or 3 rows
take longer than 16 (scripts/measure_small_rows.py). The same product computed as ``(W @ x.T).T``
(one row padded to two) takes a BLAS path that reads at full speed. Which way is faster depends on
the machine and the shape, so it is measured, once per weight shape, dtype and row count, the first
time it is needed, and the faster way is kept.
"""

from __future__ import annotations

import time

import torch

SMALL_ROWS = range(1, 9)  # the row counts that are measured; all others take the usual way
MEASURED_FROM_BYTES = 1 << 18  # a smaller weight costs microseconds either way: the usual way, unmeasured
OUT_OF_CACHE_BYTES, MAX_COPIES = 64 << 20, 160  # twice the last-level cache of the machine measured (32 MiB)
_faster_swapped: dict[tuple, bool] = {}  # (out, in, dtype, rows) -> whether (W @ x.T).T won


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


def _swapped_is_faster(weight: torch.Tensor, rows: int) -> bool:
    key = (*weight.shape, weight.dtype)
    if (*key, rows) not in _faster_swapped:
        _faster_swapped.update({(*key, r): won for r, won in _measure(weight).items()})
    return _faster_swapped[(*key, rows)]


def _measure(weight: torch.Tensor) -> dict[int, bool]:
    """For each of SMALL_ROWS, whether the swapped way is clearly faster for ``weight``'s shape."""
    size = weight.numel() * weight.element_size()
    if size < MEASURED_FROM_BYTES:
        return dict.fromkeys(SMALL_ROWS, False)
    # In a forward each weight comes from memory, not the cache: time both ways over copies of the
    # weight that together outgrow the caches, as a forward's layers do.
    won = {}
    with torch.no_grad():
        copies = [weight] + [weight.clone() for _ in range(min(MAX_COPIES, OUT_OF_CACHE_BYTES // size))]
        for rows in SMALL_ROWS:
            x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
            usual = best_seconds(lambda x=x: [torch.nn.functional.linear(x, w) for w in copies])
            swapped = best_seconds(lambda x=x: [_swapped(w, x) for w in copies])
            won[rows] = swapped < 0.9 * usual  # a clear win only: timing is noisy
    return won


class SmallRowsLinear(torch.nn.Linear):
    """``nn.Linear`` that computes 1-8 rows on the CPU the faster of the two ways."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        w = self.weight
        if rows not in SMALL_ROWS or w.device.type != "cpu" or torch.is_grad_enabled() and w.requires_grad:
            return super().forward(x)
        if not _swapped_is_faster(w, rows):
            return super().forward(x)
        y = _swapped(w, x.reshape(rows, -1))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], w.shape[0])


def enable_small_rows(model: torch.nn.Module) -> None:
    """Makes every ``nn.Linear`` of ``model`` (a target loaded for decoding) a :class:`SmallRowsLinear`:
    same weights, same results to float rounding; training (gradients on) and other devices take the
    usual way. Idempotent."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = SmallRowsLinear
