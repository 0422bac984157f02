"""The step transaction against real Redis: a re-sent transaction stores nothing twice."""

from __future__ import annotations

import copy

import redis

from shared.keys import Keys
from shared.protocol import unpack_event
from worker.engine.types import RequestOutput
from worker.publisher import InFlight, Publisher

KEYS = Keys("tfpub")


def test_a_resent_step_transaction_is_stored_once(client: redis.Redis) -> None:
    publisher = Publisher(KEYS, "m", "w1", job_ttl_s=60, stream_maxlen=100)
    job = InFlight(id="j", stream="s", entry_id=b"1-0", reply_channel="", num_prompt_tokens=3)
    publisher.start(job)
    publisher.emit(job, RequestOutput(id="j", new_token_ids=[5], text_delta="Hello"))
    first = copy.deepcopy(publisher.outbox)
    publisher.flush(client, [])
    publisher.outbox = first  # the retry of a transaction whose reply was lost
    publisher.flush(client, [])
    events = [unpack_event(raw) for raw in client.lrange(KEYS.job_events("j"), 0, -1)]
    assert [e.seq for e in events] == [0, 1]
    assert client.get(KEYS.job_text("j")) == b"Hello"
    publisher.emit(job, RequestOutput(id="j", new_token_ids=[6], text_delta=" world",
                                      finished=True, finish_reason="length",
                                      num_output_tokens=2))
    publisher.flush(client, [])
    events = [unpack_event(raw) for raw in client.lrange(KEYS.job_events("j"), 0, -1)]
    assert [e.seq for e in events] == [0, 1, 2, 3]
    assert client.get(KEYS.job_text("j")) == b"Hello world"
    assert client.hget(KEYS.job("j"), "status") == b"succeeded"
