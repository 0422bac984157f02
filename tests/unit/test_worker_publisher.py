"""Engine outputs -> wire events and job writes (no Redis needed)."""

from __future__ import annotations

from shared.keys import Keys
from shared.protocol import TokenEvent, pack, pack_events, unpack_events
from worker.engine.types import RequestOutput
from worker.publisher import InFlight, JobWrites, Publisher, pack_event_batch


def make_publisher() -> Publisher:
    return Publisher(Keys("t"), "m", "w1", job_ttl_s=60, events_ttl_s=5, stream_maxlen=100)


def make_job(seq: int = 0, attempt: int = 1) -> InFlight:
    return InFlight(id="j", stream="s", entry_id=b"1-0", reply_channel="ch",
                    num_prompt_tokens=3, attempt=attempt, next_seq=seq)


def writes(publisher: Publisher, attempt: int = 1) -> JobWrites:
    return publisher.outbox.jobs[("j", attempt)]


def kinds(publisher: Publisher) -> list[tuple[str, int, str | None]]:
    return [(e.type, e.seq, e.finish_reason) for e in writes(publisher).events]


def test_event_batch_bytes_match_pack_events() -> None:
    events = [TokenEvent("a", 0, "start"), TokenEvent("a", 1, "token", text="hi", token_ids=[5])]
    batch = pack_event_batch([pack(e) for e in events])
    assert batch == pack_events(events)
    assert unpack_events(batch) == events


def test_start_token_done_sequence_and_ack() -> None:
    publisher, job = make_publisher(), make_job()
    publisher.start(job)
    publisher.emit(job, RequestOutput("j", [7], " a", num_output_tokens=1, first_token=True))
    publisher.emit(job, RequestOutput("j", [8], " b", finished=True, finish_reason="stop",
                                      num_prompt_tokens=3, num_output_tokens=2))

    assert kinds(publisher) == [("start", 0, None), ("token", 1, None), ("token", 2, None),
                                ("done", 3, "stop")]
    job_writes = writes(publisher)
    assert job_writes.text == [" a", " b"]
    assert (job_writes.is_start, job_writes.is_finish, job_writes.is_ack) == (True, True, True)
    fields = job_writes.fields
    assert (fields["status"], fields["completion_tokens"], fields["worker"]) == (
        "succeeded", "2", "w1")
    assert float(fields["started_at"]) <= float(fields["first_token_at"])
    assert float(fields["first_token_at"]) <= float(fields["finished_at"])
    assert "error" not in fields
    assert not publisher.outbox.acks  # the job's ack is written by its fenced script


def test_first_token_time_only_with_the_first_token() -> None:
    publisher, job = make_publisher(), make_job()
    publisher.emit(job, RequestOutput("j", [7], " a", num_output_tokens=2))
    assert "first_token_at" not in writes(publisher).fields


def test_writes_of_two_attempts_stay_apart() -> None:
    publisher = make_publisher()
    old, new = make_job(attempt=1), make_job(seq=5, attempt=2)
    publisher.emit(old, RequestOutput("j", [7], " a", num_output_tokens=1))
    publisher.start(new, is_restart=True)
    assert [e.seq for e in writes(publisher, 1).events] == [0]
    assert [e.type for e in writes(publisher, 2).events] == ["restart", "start"]


def test_restart_comes_before_start() -> None:
    publisher, job = make_publisher(), make_job(seq=4)
    publisher.start(job, is_restart=True)
    assert kinds(publisher) == [("restart", 4, None), ("start", 5, None)]


def test_engine_error_becomes_an_error_event_and_failed_job() -> None:
    publisher, job = make_publisher(), make_job()
    publisher.emit(job, RequestOutput("j", finished=True, finish_reason="error", error="boom"))
    [event] = writes(publisher).events
    assert (event.type, event.error) == ("error", "boom")
    assert writes(publisher).fields["status"] == "failed"
    assert writes(publisher).fields["error"] == "boom"


def test_cancelled_finish_is_a_done_event_without_tokens() -> None:
    publisher, job = make_publisher(), make_job()
    publisher.emit(job, RequestOutput("j", finished=True, finish_reason="cancelled",
                                      num_output_tokens=4))
    assert kinds(publisher) == [("done", 0, "cancelled")]
    assert writes(publisher).fields["status"] == "cancelled"
    assert not writes(publisher).text


def test_dead_letter_keeps_raw_fields_and_acks() -> None:
    publisher = make_publisher()
    publisher.dead_letter("s", b"2-0", {b"m": b"junk"}, "not valid msgpack")
    [dead] = publisher.outbox.dead_letters
    assert dead.fields[b"m"] == b"junk"
    assert dead.fields[b"reason"] == b"not valid msgpack"
    assert publisher.outbox.acks == [("s", b"2-0")]
