"""tokenfleet.client (against a scripted gateway) and the dispatcher's pure parts."""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from shared.webhook_url import is_public_address, parse_webhook_url
from tokenfleet import cli
from tokenfleet.client import JobsClient, JobsClientError, describe_progress
from webhooks.delivery import pinned
from webhooks.dispatcher import RETRY_MAX_S, backoff_s
from webhooks.main import new_secret
from webhooks.signing import Signer


def job(status: str, **extra: Any) -> dict[str, Any]:
    return {"id": "job-1", "status": status, "queue_position": None,
            "estimated_start_s": None, "text": "", **extra}


class Gateway:
    """Answers in order; records each request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def client_of(gateway: Gateway, sleeps: list[float]) -> JobsClient:
    return JobsClient("http://gw", transport=httpx.MockTransport(gateway),
                      sleep=sleeps.append)


def test_submit_retries_with_the_same_idempotency_key() -> None:
    gateway = Gateway(httpx.ConnectError("reset"),
                      httpx.Response(503, headers={"Retry-After": "3"}, json={}),
                      httpx.Response(202, json=job("queued"),
                                     headers={"Idempotent-Replayed": "true"}))
    sleeps: list[float] = []
    with client_of(gateway, sleeps) as client:
        body = client.submit({"prompt": "hi"})
    keys = {request.headers["idempotency-key"] for request in gateway.requests}
    assert len(gateway.requests) == 3 and len(keys) == 1
    assert sleeps == [1, 3.0]
    assert body["idempotent_replay"] is True


def test_submit_does_not_retry_a_refusal() -> None:
    error = {"error": {"message": "max_tokens is too large", "param": "max_tokens"}}
    gateway = Gateway(httpx.Response(400, json=error))
    with client_of(gateway, []) as client, pytest.raises(JobsClientError) as raised:
        client.submit({"prompt": "hi"}, idempotency_key="mine")
    assert raised.value.status == 400 and "max_tokens is too large" in str(raised.value)
    assert gateway.requests[0].headers["idempotency-key"] == "mine"


def test_wait_polls_as_often_as_retry_after_says() -> None:
    gateway = Gateway(
        httpx.Response(200, json=job("queued", queue_position=3, estimated_start_s=6.0),
                       headers={"Retry-After": "3"}),
        httpx.Response(200, json=job("running", text="Hel"), headers={"Retry-After": "1"}),
        httpx.Response(200, json=job("succeeded", text="Hello")))
    sleeps: list[float] = []
    seen: list[str] = []
    with client_of(gateway, sleeps) as client:
        final = client.wait("job-1", on_update=lambda j: seen.append(describe_progress(j)))
    assert final["text"] == "Hello"
    assert sleeps == [3.0, 1.0]
    assert seen == ["queued, 3 ahead, starts in ~6 s", "running, 3 characters so far",
                    "succeeded"]


def test_wait_gives_up_at_its_timeout() -> None:
    gateway = Gateway(httpx.Response(200, json=job("queued"), headers={"Retry-After": "30"}))
    with client_of(gateway, []) as client, pytest.raises(JobsClientError, match="not finished"):
        client.wait("job-1", timeout_s=0)


def test_iter_jobs_follows_the_pages() -> None:
    pages = [{"data": [job("queued", id="b"), job("queued", id="a")], "has_more": True,
              "last_id": "a", "first_id": "b"},
             {"data": [job("failed", id="z")], "has_more": False, "last_id": "z",
              "first_id": "z"}]
    gateway = Gateway(*[httpx.Response(200, json=page) for page in pages])
    with client_of(gateway, []) as client:
        assert [j["id"] for j in client.iter_jobs(page_size=2)] == ["b", "a", "z"]
    assert gateway.requests[1].url.params["after"] == "a"


def test_the_cli_submits_and_waits(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    gateway = Gateway(httpx.Response(202, json=job("queued")),
                      httpx.Response(200, json=job("succeeded", text="Hi!")))
    real = JobsClient.__init__

    def scripted(self: JobsClient, base_url: str, api_key: str | None = None,
                 **_: object) -> None:
        real(self, base_url, api_key, transport=httpx.MockTransport(gateway),
             sleep=lambda s: None)

    monkeypatch.setattr(JobsClient, "__init__", scripted)
    code = cli.main(["jobs", "submit", "--message", "Hi", "--max-tokens", "8", "--wait",
                     "--webhook", "https://example.com/h", "--webhook-events", "start,completed"])
    assert code == 0
    sent = json.loads(gateway.requests[0].content)
    assert sent == {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                    "webhook": "https://example.com/h",
                    "webhook_events_filter": ["start", "completed"]}
    out = capsys.readouterr()
    assert json.loads(out.out)["text"] == "Hi!"
    assert "job-1: succeeded" in out.err


def test_backoff_doubles_with_jitter_up_to_a_cap() -> None:
    rng = random.Random(7)
    for failures in range(1, 30):
        ceiling = min(RETRY_MAX_S, 2.0 * 2 ** (failures - 1))
        assert ceiling / 2 <= backoff_s(failures, 2.0, rng) <= ceiling
    delays = {round(backoff_s(3, 2.0, rng), 3) for _ in range(20)}
    assert len(delays) > 10  # jittered


def test_signatures_verify_with_standardwebhooks() -> None:
    secret = new_secret()
    body = json.dumps({"id": "job-1", "status": "succeeded"}).encode()
    headers = Signer(secret).headers("msg_job-1_completed", body, "completed",
                                     now=datetime.now(tz=timezone.utc))
    assert Webhook(secret).verify(body, headers) == {"id": "job-1", "status": "succeeded"}
    assert headers["webhook-id"] == "msg_job-1_completed"
    with pytest.raises(Exception, match="signature"):
        Webhook(new_secret()).verify(body, headers)


def test_a_delivery_goes_to_the_checked_address() -> None:
    target = parse_webhook_url("https://hooks.example.com:8443/a/b?x=1")
    url, headers, extensions = pinned(target, "93.184.215.14")
    assert url == "https://93.184.215.14:8443/a/b?x=1"
    assert headers == {"host": "hooks.example.com:8443"}
    assert extensions == {"sni_hostname": "hooks.example.com"}
    url, headers, _ = pinned(parse_webhook_url("http://example.com"), "2606:2800::1")
    assert url == "http://[2606:2800::1]/" and headers == {"host": "example.com"}


@pytest.mark.parametrize(("address", "public"), [
    ("93.184.215.14", True), ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
    ("127.0.0.1", False), ("10.0.0.1", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("::1", False), ("fe80::1", False), ("fc00::1", False),
    ("::ffff:10.0.0.1", False), ("224.0.0.1", False)])
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(address) is public


def test_up_says_whether_webhooks_are_on() -> None:
    from shared.settings import Settings
    from tokenfleet.up import webhooks_mode

    assert webhooks_mode(Settings()).startswith("off (set TOKENFLEET_WEBHOOK_SECRET")
    on = webhooks_mode(Settings(webhook_secret=new_secret(), webhook_allow_private=True))
    assert on.startswith("one dispatcher") and "private hosts allowed" in on


@pytest.mark.parametrize("secret", ["hunter2", "whsec_!!!", "whsec_" + "QQ==" * 2])
def test_a_bad_webhook_secret_is_refused_at_start(secret: str) -> None:
    from pydantic import ValidationError

    from shared.settings import Settings

    with pytest.raises(ValidationError, match="TOKENFLEET_WEBHOOK_SECRET"):
        Settings(webhook_secret=secret)
    assert Settings(webhook_secret="").webhook_secret is None  # compose's empty default
