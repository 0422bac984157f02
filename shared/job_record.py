"""The job record (``Keys.job``): status values, field names, a typed view, and every Lua
script that touches the job hash. The gateway and the worker both use this module, as they
use ``shared.keys`` for key names.

Writers:
- the gateway creates the record with ``ENQUEUE_LUA`` (record, stream entry, queue number,
  the key's job index and the ``Idempotency-Key`` binding at once), cancels
  (``CANCEL_LUA``) and purges (``PURGE_LUA``);
- a worker takes each delivery with ``BEGIN_ATTEMPT_LUA`` (the job's ``attempt`` goes up by
  one) and writes everything after that with ``WRITE_JOBS_LUA`` / ``PUBLISH_JOB_EVENTS_LUA``,
  which first check that the job's current attempt is still the writer's. A worker that
  stalled past the claim idle time and lost the request to another one so writes nothing
  more for it: no events, text, pub/sub messages, final state or ack (fencing).

Webhook events (``Keys.webhook_events``) are written by the same scripts that write a job's
start and its terminal state (``WRITE_JOBS_LUA``, ``CANCEL_LUA``), in the same atomic step:
a job that asks for webhooks gets exactly one ``start`` and one ``completed`` event, each
with a snapshot of its record (and text), and only from the writer whose attempt is
current. ``webhooks/`` delivers them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from string import Template

# --- status -------------------------------------------------------------------------------

STATUS_QUEUED = "queued"
STATUS_RUNNING = "running"
STATUS_SUCCEEDED = "succeeded"
STATUS_FAILED = "failed"
STATUS_CANCELLED = "cancelled"
TERMINAL_STATUSES = frozenset({STATUS_SUCCEEDED, STATUS_FAILED, STATUS_CANCELLED})

STATUS_BY_FINISH_REASON: dict[str, str] = {
    "stop": STATUS_SUCCEEDED,
    "length": STATUS_SUCCEEDED,
    "cancelled": STATUS_CANCELLED,
    "error": STATUS_FAILED,
    "timeout": STATUS_FAILED,
}


def status_for_finish(finish_reason: str) -> str:
    """The terminal status a finish reason leads to (unknown reasons count as failures)."""
    return STATUS_BY_FINISH_REASON.get(finish_reason, STATUS_FAILED)


# --- fields -------------------------------------------------------------------------------


class JobField(StrEnum):
    """Every field of the job hash."""

    STATUS = "status"
    OWNER = "owner"  # API key id ("" when auth is off)
    MODEL = "model"
    KIND = "kind"  # "chat" | "completion"
    LANE = "lane"
    STREAM = "stream"  # "1": the client asked for SSE
    GATEWAY = "gateway"  # the gateway that queued it
    CREATED_AT = "created_at"  # unix seconds, by the gateway
    STARTED_AT = "started_at"  # unix seconds, by the worker of the current attempt
    FIRST_TOKEN_AT = "first_token_at"  # unix seconds: the current attempt's first token
    FINISHED_AT = "finished_at"
    PROMPT_TOKENS = "prompt_tokens"
    COMPLETION_TOKENS = "completion_tokens"
    MAX_TOKENS = "max_tokens"
    FINISH_REASON = "finish_reason"
    ERROR = "error"
    WORKER = "worker"  # the worker of the current attempt
    ATTEMPT = "attempt"  # deliveries taken so far; only the current one may write
    QUEUE_SEQ = "queue_seq"  # its number in its lane's stream (entries-added at its XADD)
    WEBHOOK = "webhook"  # URL to notify (POST /v1/jobs), absent when none
    WEBHOOK_EVENTS = "webhook_events"  # the events to send, comma-separated ("start,completed")
    IDEMPOTENCY = "idempotency"  # Redis key of its Idempotency-Key binding (purge deletes it)
    TOOL_MODE = "tool_mode"  # how the answer's tool calls are parsed (gateway.tools); absent
    ECHO = "echo"  # completions with echo: the prompt text shown before the answer; absent


def str_field(mapping: Mapping[bytes, bytes], name: str) -> str | None:
    value = mapping.get(name.encode())
    return None if value is None else value.decode("utf-8", "replace")


def int_field(mapping: Mapping[bytes, bytes], name: str) -> int | None:
    value = mapping.get(name.encode())
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def float_field(mapping: Mapping[bytes, bytes], name: str) -> float | None:
    value = mapping.get(name.encode())
    try:
        return None if value is None or value == b"" else float(value)
    except ValueError:
        return None


@dataclass(slots=True)
class JobRecord:
    """The job hash as typed values; ``None`` = not (yet) written.

    A partial record is an update: ``to_mapping()`` holds only the fields that are set."""

    status: str | None = None
    owner: str | None = None
    model: str | None = None
    kind: str | None = None
    lane: str | None = None
    stream: bool | None = None
    gateway: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    max_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    worker: str | None = None
    attempt: int | None = None
    queue_seq: int | None = None
    webhook: str | None = None
    webhook_events: str | None = None
    idempotency: str | None = None
    tool_mode: str | None = None
    echo: str | None = None

    @classmethod
    def from_hash(cls, mapping: Mapping[bytes, bytes]) -> JobRecord:
        """Parse ``HGETALL``; a malformed number reads as ``None``, "" as ``None``."""
        stream = str_field(mapping, JobField.STREAM)
        return cls(
            status=str_field(mapping, JobField.STATUS),
            owner=str_field(mapping, JobField.OWNER),
            model=str_field(mapping, JobField.MODEL),
            kind=str_field(mapping, JobField.KIND),
            lane=str_field(mapping, JobField.LANE),
            stream=None if stream is None else stream == "1",
            gateway=str_field(mapping, JobField.GATEWAY),
            created_at=float_field(mapping, JobField.CREATED_AT),
            started_at=float_field(mapping, JobField.STARTED_AT),
            first_token_at=float_field(mapping, JobField.FIRST_TOKEN_AT),
            finished_at=float_field(mapping, JobField.FINISHED_AT),
            prompt_tokens=int_field(mapping, JobField.PROMPT_TOKENS),
            completion_tokens=int_field(mapping, JobField.COMPLETION_TOKENS),
            max_tokens=int_field(mapping, JobField.MAX_TOKENS),
            finish_reason=str_field(mapping, JobField.FINISH_REASON) or None,
            error=str_field(mapping, JobField.ERROR) or None,
            worker=str_field(mapping, JobField.WORKER) or None,
            attempt=int_field(mapping, JobField.ATTEMPT),
            queue_seq=int_field(mapping, JobField.QUEUE_SEQ),
            webhook=str_field(mapping, JobField.WEBHOOK) or None,
            webhook_events=str_field(mapping, JobField.WEBHOOK_EVENTS) or None,
            idempotency=str_field(mapping, JobField.IDEMPOTENCY) or None,
            tool_mode=str_field(mapping, JobField.TOOL_MODE) or None,
            echo=str_field(mapping, JobField.ECHO) or None,
        )

    def to_mapping(self) -> dict[str, str]:
        """The set fields as hash values (bools "1"/"0", floats ``repr``)."""
        mapping: dict[str, str] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None:
                continue
            if isinstance(value, bool):
                mapping[item.name] = "1" if value else "0"
            elif isinstance(value, float):
                mapping[item.name] = repr(value)
            else:
                mapping[item.name] = str(value)
        return mapping

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


def _lua(source: str) -> str:
    """Field names and statuses substituted into a script (``$status``, ``$S_queued`` ...)."""
    names = {f"F_{member.name.lower()}": member.value for member in JobField}
    statuses = {f"S_{s}": s for s in (STATUS_QUEUED, STATUS_RUNNING, STATUS_CANCELLED,
                                      STATUS_SUCCEEDED, STATUS_FAILED)}
    return Template(source).substitute(names, **statuses)


# A Lua function the scripts that write a job's start or end include: when the job names a
# webhook and its filter has ``event``, append the event with a snapshot of the job hash
# (fields as ``f:<name>``) and ``text`` to the webhook stream. ``job_key`` is also how the
# dispatcher learns the job id (``Keys.job``).
_EMIT_WEBHOOK = """
local function emit_webhook(job_key, stream, event, text)
  local hook = redis.call('HMGET', job_key, '$F_webhook', '$F_webhook_events')
  if (not hook[1]) or hook[1] == '' then return end
  local wanted = ',' .. (hook[2] or 'completed') .. ','
  if not string.find(wanted, ',' .. event .. ',', 1, true) then return end
  local entry = {'event', event, 'job_key', job_key, 'text', text}
  local h = redis.call('HGETALL', job_key)
  for i = 1, #h, 2 do
    entry[#entry + 1] = 'f:' .. h[i]
    entry[#entry + 1] = h[i + 1]
  end
  redis.call('XADD', stream, '*', unpack(entry))
end
local function is_terminal(status)
  return status == '$S_succeeded' or status == '$S_failed' or status == '$S_cancelled'
end
"""

WEBHOOK_EVENT_FIELD_PREFIX = "f:"  # job hash fields in a webhook event entry


# --- Lua: the gateway -------------------------------------------------------------------

# Cancel: set the cancel flag unless the job is over; a job still queued is cancelled on the
# spot (the worker that later reads it sees the flag and skips it), which is its end: its
# ``completed`` webhook event is written here.
# KEYS: job hash, cancel flag, [webhook event stream]. ARGV: flag ttl, now (unix s), owner.
# Returns 1, or 0 when the job is unknown or someone else's.
CANCEL_LUA = _lua(_EMIT_WEBHOOK + """
local owner = redis.call('HGET', KEYS[1], '$F_owner')
if (not owner) or owner ~= ARGV[3] then return 0 end
local status = redis.call('HGET', KEYS[1], '$F_status')
if status == '$S_queued' or status == '$S_running' then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
end
if status == '$S_queued' then
  redis.call('HSET', KEYS[1], '$F_status', '$S_cancelled', '$F_finished_at', ARGV[2],
             '$F_finish_reason', 'cancelled')
  if KEYS[3] then emit_webhook(KEYS[1], KEYS[3], 'completed', '') end
end
return 1
""")

# Enqueue: the stream entry first (the one write that may be refused, e.g. OOM: then nothing
# is written), its number in the lane (``queue_seq``: the lane counter kept equal to the
# stream's entries-added, seeded from XINFO STREAM when missing), the job hash with its TTL,
# the key's job index (trimmed to the TTL) and the Idempotency-Key binding. With a binding
# already there, nothing is written and the bound job is returned.
# KEYS: job hash, request stream, lane counter, owner's job index, idempotency binding.
# ARGV: 1 job ttl, 2 stream maxlen, 3 packed request, 4 created_at, 5 index it (0/1),
#       6 index cutoff (created_at below it is trimmed), 7 idempotency ttl (0: no key),
#       8 fingerprint, 9 job id, 10.. job hash field/value items.
# Returns {1, job id, fingerprint} when queued; {0, bound job id, its fingerprint} if not.
ENQUEUE_LUA = _lua("""
if ARGV[7] ~= '0' then
  local bound = redis.call('HMGET', KEYS[5], 'fingerprint', 'job')
  if bound[2] then return {0, bound[2], bound[1] or ''} end
end
local entry_id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[3])
local seq
if redis.call('EXISTS', KEYS[3]) == 1 then
  seq = redis.call('INCR', KEYS[3])
else
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  seq = redis.call('XLEN', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'entries-added' then seq = info[i + 1] end
  end
  redis.call('SET', KEYS[3], seq)
end
redis.call('HSET', KEYS[1], unpack(ARGV, 10, #ARGV))
redis.call('HSET', KEYS[1], '$F_queue_seq', seq)
redis.call('EXPIRE', KEYS[1], ARGV[1])
if ARGV[5] == '1' then
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[9])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[6])
  redis.call('EXPIRE', KEYS[4], ARGV[1])
end
if ARGV[7] ~= '0' then
  redis.call('HSET', KEYS[5], 'fingerprint', ARGV[8], 'job', ARGV[9])
  redis.call('EXPIRE', KEYS[5], ARGV[7])
end
return {1, ARGV[9], ARGV[8]}
""")

# Purge: remove a finished job now (record, text, events, cancel flag, index entry, its
# Idempotency-Key binding). KEYS: job hash, text, events, cancel flag, owner's job index,
# idempotency binding (the job's ``idempotency`` field; any unused name when none).
# ARGV: owner, job id. Returns 1 purged, 0 unknown or someone else's, -1 not finished.
PURGE_LUA = _lua(_EMIT_WEBHOOK + """
local found = redis.call('HMGET', KEYS[1], '$F_owner', '$F_status', '$F_idempotency')
if (not found[1]) or found[1] ~= ARGV[1] then return 0 end
if not is_terminal(found[2]) then return -1 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[2])
if found[3] and found[3] == KEYS[6] then redis.call('DEL', KEYS[6]) end
return 1
""")

# --- Lua: the worker --------------------------------------------------------------------

# A worker takes a delivery: the attempt goes up by one, which fences off every writer of
# an earlier attempt, atomically with what the new attempt must know to start.
# A job that already has its result (succeeded, failed, or cancelled with no cancel flag
# left) gets no new attempt: its entry is a leftover delivery (the finishing worker acked it
# after another worker had claimed it), and starting again would leave it ``running``.
# KEYS: job hash, events list, cancel flag. ARGV: job ttl (s), used when the hash has none.
# Returns {attempt, number of stored events (the next seq), cancel flag set (0/1),
# already finished (0/1; then nothing was changed)}.
BEGIN_ATTEMPT_LUA = _lua("""
local status = redis.call('HGET', KEYS[1], '$F_status')
local cancelled = redis.call('EXISTS', KEYS[3])
if status == '$S_succeeded' or status == '$S_failed'
    or (status == '$S_cancelled' and cancelled == 0) then
  return {0, 0, 0, 1}
end
local attempt = redis.call('HINCRBY', KEYS[1], '$F_attempt', 1)
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return {attempt, redis.call('LLEN', KEYS[2]), cancelled, 0}
""")

WRITE_NO_ACK = ""  # a job's entry id in WRITE_JOBS_LUA when there is nothing to acknowledge

# Everything one flush writes for one job, only while ARGV[1] is the job's current attempt.
# Events and text are stored once: a transaction re-sent after a lost reply finds the list
# already past its first seq and stores them again only if Redis lost them. A start resets
# the text (a new attempt generates it again). A finish compacts: the event list is kept
# only for the replay window, the hash and the text (stored again at its exact size) for
# the job ttl, the cancel flag goes, and the request entry is acknowledged (here, so a
# fenced-off writer never acks another worker's delivery). The job's webhook events go in
# the same step: ``start`` when it leaves ``queued``, ``completed`` when it first reaches a
# terminal status (a job cancelled while queued already had it from ``CANCEL_LUA``).
# KEYS: job hash, events list, text, cancel flag, request stream, [webhook event stream].
# ARGV: 1 attempt, 2 first seq, 3 is start (0/1), 4 is finish (0/1), 5 job ttl (s),
#       6 events ttl after finish (s), 7 group, 8 entry id to ack (WRITE_NO_ACK: none),
#       9 text, 10 number n of field/value items, 11..10+n the items, then packed events.
# Returns 1 written, 0 events already stored (the rest written), -1 fenced off (nothing).
_WRITE_JOB = """
local function write_job(KEYS, ARGV)
local current = redis.call('HGET', KEYS[1], '$F_attempt') or '0'
if current ~= ARGV[1] then return -1 end
local before = redis.call('HGET', KEYS[1], '$F_status')
local num_items = tonumber(ARGV[10])
local first_event = 11 + num_items
local stored = 1
if #ARGV >= first_event then
  if redis.call('LLEN', KEYS[2]) > tonumber(ARGV[2]) then
    stored = 0
  else
    if ARGV[3] == '1' then redis.call('SET', KEYS[3], '', 'EX', ARGV[5]) end
    for i = first_event, #ARGV, 1000 do
      redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
    end
    if #ARGV[9] > 0 then redis.call('APPEND', KEYS[3], ARGV[9]) end
  end
end
if num_items > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 11, 10 + num_items)) end
if ARGV[3] == '1' then redis.call('EXPIRE', KEYS[2], ARGV[5]) end
if ARGV[3] == '1' and KEYS[6] and before == '$S_queued' then
  emit_webhook(KEYS[1], KEYS[6], 'start', '')
end
if ARGV[4] == '1' then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  local text = redis.call('GET', KEYS[3])  -- stored again: APPEND left it over-allocated
  if text then redis.call('SET', KEYS[3], text, 'EX', ARGV[5]) end
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  redis.call('DEL', KEYS[4])
  if KEYS[6] and not is_terminal(before) then
    emit_webhook(KEYS[1], KEYS[6], 'completed', text or '')
  end
end
if ARGV[8] ~= '' then redis.call('XACK', KEYS[5], ARGV[7], ARGV[8]) end
return stored
end
"""

# ``_WRITE_JOB`` for every job of one flush in one call (one script run per step instead of
# one per running request: the per-call cost of EVALSHA and of the client's command
# packing was most of a step's Redis work). Each job is fenced and written on its own.
# KEYS: the 6 keys of each job in turn. ARGV: per job, the number n of its arguments, then
# its n arguments. Returns the replies of the jobs, in order.
WRITE_JOBS_LUA = _lua(_EMIT_WEBHOOK + _WRITE_JOB + """
local replies = {}
local at = 1
for j = 1, #KEYS / 6 do
  local k = 6 * (j - 1)
  local n = tonumber(ARGV[at])
  local args = {}  -- a loop, not unpack(): a job's events may exceed Lua's stack
  for i = 1, n do args[i] = ARGV[at + i] end
  replies[j] = write_job({KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5],
                          KEYS[k + 6]}, args)
  at = at + 1 + n
end
return replies
""")

# One pub/sub message (a msgpack array of packed events) with the events of the jobs whose
# attempt is still the writer's; the others' events are dropped, so a subscriber never
# hears a fenced-off worker.
# KEYS: the job hashes. ARGV: 1 channel, then per job in KEYS order: attempt, number n of
# events, the n packed events. Returns the number of events published.
PUBLISH_JOB_EVENTS_LUA = _lua("""
local parts = {}
local at = 2
for k = 1, #KEYS do
  local attempt, n = ARGV[at], tonumber(ARGV[at + 1])
  at = at + 2
  if (redis.call('HGET', KEYS[k], '$F_attempt') or '0') == attempt then
    for i = at, at + n - 1 do parts[#parts + 1] = ARGV[i] end
  end
  at = at + n
end
local count = #parts
if count == 0 then return 0 end
local header
if count < 16 then
  header = string.char(0x90 + count)
elseif count < 65536 then
  header = string.char(0xdc, math.floor(count / 256), count % 256)
else
  header = string.char(0xdd, math.floor(count / 16777216) % 256,
                       math.floor(count / 65536) % 256, math.floor(count / 256) % 256,
                       count % 256)
end
redis.call('PUBLISH', ARGV[1], header .. table.concat(parts))
return count
""")
