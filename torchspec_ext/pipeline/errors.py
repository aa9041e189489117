"""Exceptions of the tensor pipeline: every failure of a channel is a ``ChannelError``."""

__all__ = ["ChannelError", "ChannelClosed", "ChannelTimeout", "HeaderMismatch"]


class ChannelError(RuntimeError):
    """The channel cannot go on: the peer failed, an operation failed, or the channel is closed."""


class ChannelClosed(ChannelError):
    """The channel was closed: by this side, or by the peer after its last batch."""


class ChannelTimeout(ChannelError, TimeoutError):
    """An operation did not complete within the channel's timeout."""


class HeaderMismatch(ChannelError, ValueError):
    """A received header is not what the peer should have sent (format, version, size or order)."""
