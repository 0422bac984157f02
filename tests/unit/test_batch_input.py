"""The Batch input format: line splitting with offsets, envelope checks."""

from __future__ import annotations

import json

import pytest

from batches.input import LineError, LineSplitter, parse_line


def split(chunks: list[bytes], limit: int = 1 << 20) -> list[tuple[int, bytes]]:
    splitter = LineSplitter(0, limit)
    out = [item for chunk in chunks for item in splitter.feed(chunk)]
    return out + list(splitter.finish())


def test_lines_keep_their_offsets_across_chunks() -> None:
    assert split([b"ab\ncd", b"ef\n\ng"]) == [(0, b"ab"), (3, b"cdef"), (8, b""), (9, b"g")]


def test_a_line_over_the_limit_is_cut_but_offsets_stay_right() -> None:
    assert split([b"abcdefgh\nij\n"], limit=3) == [(0, b"abc"), (9, b"ij")]


def good(**change: object) -> bytes:
    obj = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
           "body": {"prompt": "hi"}, **change}
    return json.dumps(obj).encode()


@pytest.mark.parametrize(("raw", "code"), [
    (b"{nope", "invalid_json_line"),
    (b"[1]", "invalid_json_line"),
    (good(custom_id=""), "missing_required_parameter"),
    (good(method="GET"), "invalid_value"),
    (good(url="/v1/embeddings"), "invalid_url"),
    (good(body="x"), "missing_required_parameter"),
])
def test_bad_envelopes(raw: bytes, code: str) -> None:
    with pytest.raises(LineError) as caught:
        parse_line(raw, 7, 0, None)
    assert caught.value.code == code
    assert caught.value.as_dict()["message"].startswith("line 7: ")


def test_every_line_must_match_the_batch_endpoint() -> None:
    assert parse_line(good(), 1, 0, "/v1/completions").custom_id == "a"
    with pytest.raises(LineError, match="differs from the batch's endpoint"):
        parse_line(good(), 1, 0, "/v1/chat/completions")
