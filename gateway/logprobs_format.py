"""OpenAI's ``logprobs`` objects from the workers' per-token entries.

An entry is ``[token text, logprob, [[text, logprob], ...]]`` (``TokenEvent.logprobs``).
Chat completions show ``{"content": [{token, logprob, bytes, top_logprobs}]}``; text
completions the legacy ``{tokens, token_logprobs, top_logprobs, text_offset}``.
"""

from __future__ import annotations

from typing import Any


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[list[Any]]) -> dict[str, Any]:
    content = []
    for text, logprob, top in entries:
        item = _token(text, logprob)
        item["top_logprobs"] = [_token(t, lp) for t, lp in top]
        content.append(item)
    return {"content": content}


def completion_logprobs(entries: list[list[Any]], text_offset: int = 0) -> dict[str, Any]:
    """``text_offset``: where the first token's text starts in the choice's text."""
    tokens: list[str] = []
    values: list[float] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = text_offset
    for text, logprob, top in entries:
        tokens.append(text)
        values.append(logprob)
        tops.append({t: lp for t, lp in top} if top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}
