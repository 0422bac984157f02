"""The API key store (digests only in Redis) and ``tokenfleet keys create|list|revoke``."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import msgpack
import pytest
import redis
import redis.asyncio as aioredis

from shared.apikeys import (
    KeyRecord,
    create_key,
    digest,
    key_id,
    list_keys,
    lookup,
    match_static,
    revoke_key,
    static_record,
    static_records,
)
from shared.errors import TokenfleetError
from shared.keys import Keys
from tests.conftest import free_port
from tests.integration.fleet import REPO

PREFIX = "tfkeys"
KEYS = Keys(PREFIX)
KEY_FORMAT = re.compile(r"tf-[A-Za-z0-9_-]{32}")


@pytest.fixture
def sync(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _everything_in(client: redis.Redis) -> bytes:
    """Every key name and every value of every type in the database, concatenated."""
    dump = b""
    for name in client.scan_iter():
        dump += name
        kind = client.type(name)
        if kind == b"hash":
            dump += b"".join(k + v for k, v in client.hgetall(name).items())
        elif kind == b"string":
            dump += client.get(name) or b""
        elif kind == b"list":
            dump += b"".join(client.lrange(name, 0, -1))
        elif kind == b"set":
            dump += b"".join(client.smembers(name))
        elif kind == b"zset":
            dump += b"".join(client.zrange(name, 0, -1))
        elif kind == b"stream":
            for _, fields in client.xrange(name):
                dump += b"".join(k + v for k, v in fields.items())
    return dump


def test_created_keys_have_the_documented_shape(sync: redis.Redis) -> None:
    key, record = create_key(sync, KEYS, "alice", rpm=60, tpm=None)
    assert KEY_FORMAT.fullmatch(key)
    assert record.id == "key_" + hashlib.sha256(key.encode()).hexdigest()[:8]
    stored = msgpack.unpackb(sync.hget(KEYS.api_keys, digest(key)), raw=False)
    assert stored == {"v": 1, "id": record.id, "name": "alice", "created_at": record.created_at,
                      "revoked": False, "rpm": 60, "tpm": None}
    assert sync.hkeys(KEYS.api_keys) == [digest(key).encode()]


def test_the_plaintext_key_is_never_stored(sync: redis.Redis) -> None:
    keys = [create_key(sync, KEYS, f"user{i}")[0] for i in range(3)]
    revoke_key(sync, KEYS, key_id(digest(keys[0])))
    dump = _everything_in(sync)
    for key in keys:
        assert key.encode() not in dump
        assert key[3:].encode() not in dump  # not even without its prefix
        assert digest(key).encode() in dump


def test_list_and_revoke(sync: redis.Redis) -> None:
    _, alice = create_key(sync, KEYS, "alice")
    _, bob = create_key(sync, KEYS, "bob", tpm=0)
    assert [(r.name, r.revoked, r.tpm) for r in list_keys(sync, KEYS)] == [
        ("alice", False, None), ("bob", False, 0)]
    assert revoke_key(sync, KEYS, bob.id).revoked
    assert [(r.id, r.revoked) for r in list_keys(sync, KEYS)] == [(alice.id, False),
                                                                (bob.id, True)]
    with pytest.raises(TokenfleetError, match="no API key"):
        revoke_key(sync, KEYS, "key_00000000")
    with pytest.raises(TokenfleetError, match="--rpm"):
        create_key(sync, KEYS, "negative", rpm=-1)


def test_malformed_records_are_ignored(sync: redis.Redis) -> None:
    sync.hset(KEYS.api_keys, "junk", b"\xc1not msgpack")
    sync.hset(KEYS.api_keys, "old", msgpack.packb({"v": 99, "id": "key_x"}))
    assert KeyRecord.unpack(b"\xc1") is None
    _, record = create_key(sync, KEYS, "good")
    assert [r.id for r in list_keys(sync, KEYS)] == [record.id]


async def test_lookup_finds_live_keys_and_refuses_revoked_ones(
        sync: redis.Redis, aredis: aioredis.Redis) -> None:
    key, record = create_key(sync, KEYS, "alice", rpm=5, tpm=0)
    found = await lookup(aredis, KEYS, digest(key))
    assert found == record and (found.rpm, found.tpm) == (5, 0)
    assert await lookup(aredis, KEYS, digest(key + "x")) is None
    assert await lookup(aredis, KEYS, digest("tf-" + "A" * 32)) is None
    revoke_key(sync, KEYS, record.id)
    assert await lookup(aredis, KEYS, digest(key)) is None


async def test_a_malformed_record_reads_as_an_unknown_key(
        sync: redis.Redis, aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    key, _ = create_key(sync, KEYS, "victim")
    for junk in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 1, "id": 7}),
                 msgpack.packb({"v": 2, "id": "key_x"})):
        sync.hset(KEYS.api_keys, digest(key), junk)
        assert await lookup(aredis, KEYS, digest(key)) is None
    assert "malformed API key record" in caplog.text


def test_revoke_accepts_a_unique_prefix_of_the_id(sync: redis.Redis) -> None:
    records = [create_key(sync, KEYS, f"user{i}")[1] for i in range(12)]
    target = records[0]
    prefix = next(target.id[:n] for n in range(5, len(target.id) + 1)
                  if sum(r.id.startswith(target.id[:n]) for r in records) == 1)
    assert revoke_key(sync, KEYS, prefix).id == target.id
    assert [r.id for r in list_keys(sync, KEYS) if r.revoked] == [target.id]
    with pytest.raises(TokenfleetError, match="several keys"):
        revoke_key(sync, KEYS, "key_")
    with pytest.raises(TokenfleetError, match="no API key"):
        revoke_key(sync, KEYS, "")
    assert revoke_key(sync, KEYS, target.id).revoked  # again: a no-op


def test_static_keys_match_by_digest() -> None:
    records = static_records(["alpha", "beta"])
    assert match_static(digest("beta"), records) == records[digest("beta")]
    assert match_static(digest("gamma"), records) is None
    assert records[digest("alpha")].id == key_id(digest("alpha"))
    assert static_record("alpha") == records[digest("alpha")]
    assert not static_record("alpha").revoked and static_record("alpha").rpm is None


def _cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TOKENFLEET_REDIS_URL=redis_url, TOKENFLEET_KEY_PREFIX=PREFIX)
    return subprocess.run([sys.executable, "-m", "tokenfleet", "keys", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def test_keys_cli_create_list_revoke(redis_url: str, sync: redis.Redis) -> None:
    created = _cli(redis_url, "create", "--name", "ci-bot", "--rpm", "60")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert KEY_FORMAT.fullmatch(key)
    assert "only time the key is shown" in created.stderr and key not in created.stderr
    assert key.encode() not in _everything_in(sync)

    listed = _cli(redis_url, "list")
    assert listed.returncode == 0, listed.stderr
    assert key not in listed.stdout and digest(key) not in listed.stdout
    [row] = [line.split() for line in listed.stdout.splitlines() if "ci-bot" in line]
    assert row[0] == key_id(digest(key)) and row[4:] == ["no", "60", "default"]

    revoked = _cli(redis_url, "revoke", row[0])
    assert revoked.returncode == 0, revoked.stderr
    assert [line.split()[4] for line in _cli(redis_url, "list").stdout.splitlines()
            if "ci-bot" in line] == ["yes"]
    missing = _cli(redis_url, "revoke", "key_nope")
    assert missing.returncode == 1 and "no API key" in missing.stderr


def test_keys_cli_without_redis_is_one_clear_line() -> None:
    result = _cli(f"redis://:s3cret@127.0.0.1:{free_port()}/0", "list")
    assert result.returncode == 1
    assert result.stderr.startswith("tokenfleet: error: Redis at redis://:***@")
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr
