"""Generated token ids to text as they arrive: incremental detokenization and the API's ``stop`` strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

REPLACEMENT = "\ufffd"  # what a decoder shows for the first bytes of a character split over tokens


@dataclass
class Piece:
    """Text safe to send now (never a part of a stop string nor half a character), the token ids
    that produced it, and whether the generation is finished (a stop string or stop token met)."""

    text: str
    token_ids: list[int]
    finished: bool = False


@dataclass
class TextStream:
    """Feeds one token at a time (:meth:`add`), decoding only the tokens since the last complete
    character (vLLM's prefix / read offsets), and cuts the text before the first ``stop`` string.
    Text that could still be the start of a stop string is held back until it cannot."""

    tokenizer: object
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (cut at a stop string)
    sent: int = 0  # characters of ``text`` handed out
    finished: bool = False
    stop_string: str | None = None  # the one that ended the text
    _prefix: int = 0
    _read: int = 0
    _held_ids: list[int] = field(default_factory=list)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> Piece:
        if self.finished:
            raise RuntimeError("TextStream: a token after the end")
        self.tokens.append(token)
        self._held_ids.append(token)
        if token in self.stop_token_ids:
            self.finished = True
            return self._flush()
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)
            for s in self.stop:
                at = self.text.find(s, start) if s else -1
                if at >= 0:  # the text is cut there, so a later stop string must be found before it
                    self.text, self.stop_string = self.text[:at], s
            if self.stop_string is not None:
                self.finished = True
                return self._flush()
        return self._flush(self._held_back())

    def close(self) -> Piece:
        """The rest, once the generation has ended without a stop: text held back as a possible stop
        string's start, or a character whose bytes never completed (shown as U+FFFD)."""
        if not self.finished:
            before = self._decode(self.tokens[self._prefix : self._read])
            after = self._decode(self.tokens[self._prefix :])
            if len(after) > len(before):
                self.text += after[len(before) :]
            self._prefix = self._read = len(self.tokens)
            self.finished = True
        return self._flush()

    def _held_back(self) -> int:
        """Characters at the end of the text that begin some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _flush(self, hold: int = 0) -> Piece:
        end = len(self.text) - hold
        piece = Piece(self.text[self.sent : end] if end > self.sent else "", [], self.finished)
        if piece.text or self.finished:
            piece.token_ids, self._held_ids = self._held_ids, []
            self.sent = max(self.sent, end)
        return piece
