"""Incremental detokenization and stop-string handling, per sequence.

Text is decoded from a sliding window of token ids (vLLM's prefix/read offsets), so a
multi-byte character split over tokens is emitted only once complete. Text that might be
the start of a stop string is held back until it is known not to be one, so a client never
sees part of a stop string.
"""

from __future__ import annotations

from typing import Protocol


class TokenDecoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, decoder: TokenDecoder, prompt_token_ids: list[int], stop: list[str]) -> None:
        self.decoder = decoder
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = list(prompt_token_ids[-6:])  # context for the first tokens
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all generated text (stop string cut off once found)
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Take one generated token; sets ``stopped`` when a stop string appears."""
        self.ids.append(token_id)
        prefix = self.decoder.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.decoder.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._append(delta)

    def _append(self, delta: str) -> None:
        if not self.stop:
            self.text += delta
            return
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        window = self.text[start:]
        cut = min((i for i in (window.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:start + cut]
            self.stopped = True

    def take_delta(self, finished: bool) -> str:
        """New text safe to show; everything left when ``finished``."""
        end = len(self.text) if finished or self.stopped else max(
            self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
