"""The shared job record: statuses, the typed record, the scripts' placeholders."""

from __future__ import annotations

from shared.job_record import (
    BEGIN_ATTEMPT_LUA,
    CANCEL_LUA,
    ENQUEUE_LUA,
    PUBLISH_JOB_EVENTS_LUA,
    PURGE_LUA,
    TERMINAL_STATUSES,
    WRITE_JOBS_LUA,
    JobField,
    JobRecord,
    status_for_finish,
)


def test_finish_reasons_map_to_terminal_statuses() -> None:
    for reason in ("stop", "length", "cancelled", "error", "timeout", "surprise"):
        assert status_for_finish(reason) in TERMINAL_STATUSES
    assert status_for_finish("length") == "succeeded"
    assert status_for_finish("surprise") == "failed"


def test_record_round_trips_through_the_hash() -> None:
    record = JobRecord(status="running", owner="", model="m", kind="chat", lane="batch",
                       stream=True, gateway="g", created_at=1.25, started_at=2.5,
                       first_token_at=3.0, finished_at=4.0, prompt_tokens=3,
                       completion_tokens=4, max_tokens=5, finish_reason="stop", error="e",
                       worker="w", attempt=2, queue_seq=7, webhook="https://example.com/h",
                       webhook_events="start,completed", idempotency="tf:idem::d",
                       tool_mode="hermes", echo="Once upon")
    mapping = record.to_mapping()
    assert set(mapping) == {field.value for field in JobField}
    assert JobRecord.from_hash({k.encode(): v.encode() for k, v in mapping.items()}) == record


def test_partial_record_is_an_update_and_bad_numbers_read_as_none() -> None:
    assert JobRecord(status="queued", stream=False).to_mapping() == {"status": "queued",
                                                                     "stream": "0"}
    parsed = JobRecord.from_hash({b"prompt_tokens": b"x", b"created_at": b"", b"error": b""})
    assert (parsed.prompt_tokens, parsed.created_at, parsed.error) == (None, None, None)


def test_scripts_name_fields_through_the_enum() -> None:
    for script in (CANCEL_LUA, BEGIN_ATTEMPT_LUA, WRITE_JOBS_LUA, PUBLISH_JOB_EVENTS_LUA,
                   ENQUEUE_LUA, PURGE_LUA):
        assert "$" not in script
    assert "'attempt'" in WRITE_JOBS_LUA and "'owner'" in CANCEL_LUA
