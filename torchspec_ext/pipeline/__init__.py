"""Tensor pipeline: batches of tensors from teacher ranks to trainer ranks, one message each.

- :class:`TensorChannel` — one rank to another, NCCL (CUDA) or gloo (CPU), packed, double-buffered.
- :func:`routes` / :class:`Router` — 1 teacher -> n trainers, n -> 1, n -> m.
- Errors: :class:`ChannelError` and its kinds; a failure is raised within the timeout, never a hang.
"""

from torchspec_ext.pipeline.channel import TensorChannel
from torchspec_ext.pipeline.errors import ChannelClosed, ChannelError, ChannelTimeout, HeaderMismatch
from torchspec_ext.pipeline.routing import Route, Router, routes

__all__ = [
    "TensorChannel",
    "Router",
    "Route",
    "routes",
    "ChannelError",
    "ChannelClosed",
    "ChannelTimeout",
    "HeaderMismatch",
]
