"""One answer's text as its tokens arrive: what may be sent now, and where a stop string cuts it.

The text is always the tokenizer's decoding of all the tokens so far (``skip_special_tokens=True``), so the
pieces streamed add up to exactly what a non-streamed answer holds, and to what ``lorakit generate`` prints.
Two things are held back until the next token settles them: a trailing U+FFFD (a character whose UTF-8 bytes
are split across tokens) and a tail that could be the start of a stop string (it is sent once it cannot be).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one choice.

    Args:
        tokenizer: decodes the token ids.
        stop: strings that end the answer where they first appear (the stop string itself is not part of it).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at the stop string once one appeared)
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False  # a stop string appeared: no more text

    def add(self, token: int) -> str:
        """Take one more token; return the text that can be sent now (often ``""``)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
                return self._release(len(self.text))
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == REPLACEMENT:
            end -= 1
        return self._release(end - self._stop_prefix(end))

    def finish(self) -> str:
        """The answer ended: the text still held back."""
        return self._release(len(self.text))

    def _stop_prefix(self, end: int) -> int:
        """The length of the longest tail of ``text[:end]`` that begins a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.sent), longest, -1):
                if self.text.endswith(s[:k], 0, end):
                    longest = k
                    break
        return longest

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : end], end
        return piece
