"""Engine outputs -> wire events and job writes (no Redis needed)."""

from __future__ import annotations

from shared.keys import Keys
from shared.protocol import TokenEvent, pack, pack_events, unpack_events
from worker.engine.types import RequestOutput
from worker.publisher import InFlight, Publisher, pack_event_batch


def make_publisher() -> Publisher:
    return Publisher(Keys("t"), "m", "w1", job_ttl_s=60, stream_maxlen=100)


def make_job(seq: int = 0) -> InFlight:
    return InFlight(id="j", stream="s", entry_id=b"1-0", reply_channel="ch",
                    num_prompt_tokens=3, next_seq=seq)


def kinds(publisher: Publisher) -> list[tuple[str, int, str | None]]:
    return [(e.type, e.seq, e.finish_reason) for _, e in publisher.outbox.events]


def test_event_batch_bytes_match_pack_events() -> None:
    events = [TokenEvent("a", 0, "start"), TokenEvent("a", 1, "token", text="hi", token_ids=[5])]
    batch = pack_event_batch([pack(e) for e in events])
    assert batch == pack_events(events)
    assert unpack_events(batch) == events


def test_start_token_done_sequence_and_ack() -> None:
    publisher, job = make_publisher(), make_job()
    publisher.start(job)
    publisher.emit(job, RequestOutput("j", [7], " a", num_output_tokens=1))
    publisher.emit(job, RequestOutput("j", [8], " b", finished=True, finish_reason="stop",
                                      num_prompt_tokens=3, num_output_tokens=2))

    assert kinds(publisher) == [("start", 0, None), ("token", 1, None), ("token", 2, None),
                                ("done", 3, "stop")]
    assert publisher.outbox.texts == {"j": [" a", " b"]}
    [(job_id, fields)] = publisher.outbox.finishes
    assert (job_id, fields["status"], fields["completion_tokens"]) == ("j", "succeeded", 2)
    assert "error" not in fields
    assert publisher.outbox.acks == [("s", b"1-0")]


def test_restart_comes_before_start() -> None:
    publisher, job = make_publisher(), make_job(seq=4)
    publisher.start(job, is_restart=True)
    assert kinds(publisher) == [("restart", 4, None), ("start", 5, None)]


def test_engine_error_becomes_an_error_event_and_failed_job() -> None:
    publisher, job = make_publisher(), make_job()
    publisher.emit(job, RequestOutput("j", finished=True, finish_reason="error", error="boom"))
    [(_, event)] = publisher.outbox.events
    assert (event.type, event.error) == ("error", "boom")
    assert publisher.outbox.finishes[0][1]["status"] == "failed"


def test_cancelled_finish_is_a_done_event_without_tokens() -> None:
    publisher, job = make_publisher(), make_job()
    publisher.emit(job, RequestOutput("j", finished=True, finish_reason="cancelled",
                                      num_output_tokens=4))
    assert kinds(publisher) == [("done", 0, "cancelled")]
    assert publisher.outbox.finishes[0][1]["status"] == "cancelled"
    assert not publisher.outbox.texts


def test_dead_letter_keeps_raw_fields_and_acks() -> None:
    publisher = make_publisher()
    publisher.dead_letter("s", b"2-0", {b"m": b"junk"}, "not valid msgpack")
    [dead] = publisher.outbox.dead_letters
    assert dead.fields[b"m"] == b"junk"
    assert dead.fields[b"reason"] == b"not valid msgpack"
    assert publisher.outbox.acks == [("s", b"2-0")]
