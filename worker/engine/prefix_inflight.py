"""Prompt blocks being prefilled right now, so that requests sharing them wait for them.

The prefix cache only hands out blocks once they are computed. When several requests with
the same long prefix arrive together (a burst of chats with one system prompt), the first
one admitted (the *leader*) prefills the prefix; without this registry every other one
would be admitted beside it, miss, and prefill the very same tokens. Instead a waiting
request whose next uncached blocks are being computed by a running row is held back (the
scheduler skips it and admits the requests behind it) until those blocks reach the cache,
chunk by chunk, and then hits on them: the prefix is computed once. This is SGLang's
in-batch prefix sharing (a request that shares at least 32 tokens with one already chosen
for the batch is deprioritized) and what vLLM's prefix-aware scheduling gives.

A block is identified by a hash chained over the blocks before it. A collision could only
make a request wait one leader's prefill for nothing: the keys and values a request gets
come from the prefix cache's own index, which compares the tokens themselves.
"""

from __future__ import annotations

from collections import Counter

_ROOT_KEY = 0


def block_keys(prompt: list[int], block_size: int, count: int | None = None) -> list[int]:
    """Chained keys of the first ``count`` (default: all) full blocks of ``prompt``."""
    full = len(prompt) // block_size
    count = full if count is None else min(count, full)
    keys, key = [], _ROOT_KEY
    for i in range(count):
        key = hash((key, tuple(prompt[i * block_size:(i + 1) * block_size])))
        keys.append(key)
    return keys


class InflightBlocks:
    """Which full prompt blocks running rows are prefilling, by chained key."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._rows: dict[str, list[int]] = {}  # sequence id -> keys it is computing
        self._count: Counter[int] = Counter()  # key -> rows computing it

    def __bool__(self) -> bool:
        return bool(self._rows)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._rows

    def start(self, seq_id: str, prompt: list[int], cached_tokens: int) -> None:
        """``seq_id`` will prefill ``prompt`` from ``cached_tokens`` on: its full blocks past
        the cached ones are in flight until ``done``."""
        self.done(seq_id)
        keys = block_keys(prompt, self.block_size)[cached_tokens // self.block_size:]
        if keys:
            self._rows[seq_id] = keys
            self._count.update(keys)

    def done(self, seq_id: str) -> None:
        """``seq_id``'s prompt is complete (its blocks are cached or never will be), or it
        left the batch."""
        keys = self._rows.pop(seq_id, None)
        if keys:
            self._count.subtract(keys)
            for key in keys:
                if self._count[key] <= 0:
                    del self._count[key]

    def ahead(self, prompt: list[int], cached_tokens: int) -> int:
        """How many of ``prompt``'s full blocks right after its first ``cached_tokens``
        (rounded down to a block) some running row is computing now, in a row."""
        if not self._count:
            return 0
        first = cached_tokens // self.block_size
        keys = block_keys(prompt, self.block_size)
        run = 0
        for key in keys[first:]:
            if key not in self._count:
                break
            run += 1
        return run
