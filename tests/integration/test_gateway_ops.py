"""Issue 9 on the gateway in-process (real worker loop in a thread): scale to zero (work is
accepted and queued with no live worker, and served once one starts), 429s counted by
cause, the dashboard page and its files, and ``/v1/fleet`` behind auth."""

from __future__ import annotations

import asyncio
import json

from prometheus_client.parser import text_string_to_metric_families

from shared.keys import Keys
from shared.settings import Settings
from tests.support.gateway import gateway_client, parse_sse
from tests.support.model import tiny_model_info
from tests.support.worker import register_worker, running_worker

PREFIX = "tfops"
KEYS = Keys(PREFIX)
API_KEY = "tf-opsopsopsopsopsopsopsopsopsopsop"


def settings_for(redis_url: str, **extra: object) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=PREFIX, **extra)


def metric(text: str, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and wanted <= set(sample.labels.items()))


async def served_once(settings: Settings) -> None:
    """A worker ran once and left: the model's info and name stay in Redis."""
    async with running_worker(settings, tiny_model_info()):
        pass


async def test_without_scale_to_zero_no_worker_means_not_ready(redis_url: str) -> None:
    settings = settings_for(redis_url)
    await served_once(settings)
    async with gateway_client(settings) as (http, _):
        assert (await http.get("/readyz")).status_code == 503
        resp = await http.post("/v1/jobs", json={"model": "tiny", "prompt": "hi"})
        assert resp.status_code == 404


async def test_scale_to_zero_queues_work_until_a_worker_starts(redis_url: str) -> None:
    settings = settings_for(redis_url, scale_to_zero=True)
    await served_once(settings)
    async with gateway_client(settings) as (http, _):
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ok", "workers": 0, "models": [],
                                "scale_to_zero": True}
        job = await http.post("/v1/jobs", json={"prompt": "hi"})  # model omitted: the one known
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        stream = asyncio.create_task(http.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hello"}],
            "stream": True}, timeout=30))
        fleet = (await http.get("/v1/fleet")).json()
        assert fleet["workers"] == []
        while fleet["models"][0]["queue_depth"] < 2:  # both wait in the stream
            await asyncio.sleep(0.02)
            fleet = (await http.get("/v1/fleet")).json()
        assert (await http.get(f"/v1/jobs/{job_id}")).json()["status"] == "queued"
        assert not stream.done()
        async with running_worker(settings, tiny_model_info()):
            response = await stream
            while (await http.get(f"/v1/jobs/{job_id}")).json()["status"] != "succeeded":
                await asyncio.sleep(0.02)
    events = parse_sse(response.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c.get("choices"))
    assert text == "Hello, world!"


async def test_throttled_requests_are_counted_by_cause(redis_url: str) -> None:
    settings = settings_for(redis_url, backlog_limit=2, auth=True, api_keys=[API_KEY],
                            rate_limit_rpm=3)
    register_worker(settings, tiny_model_info())  # live, never consumes: the queue fills
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with gateway_client(settings) as (http, app):
        codes = []
        for i in range(3):
            resp = await http.post("/v1/jobs", json={"model": "tiny", "prompt": f"{i}"},
                                   headers=headers)
            codes.append(resp.status_code)
            app.state.gateway.backlog._seen.clear()  # don't wait out the cache in a test
        assert codes == [202, 202, 429]  # the queue holds 2
        app.state.gateway.backlog.limit = 0  # no queue limit from here on
        resp = await http.post("/v1/jobs", json={"model": "tiny", "prompt": "x"},
                               headers=headers)
        assert resp.status_code == 202
        resp = await http.post("/v1/jobs", json={"model": "tiny", "prompt": "y"},
                               headers=headers)
        assert resp.status_code == 429  # 3 per minute, and the refused one did not count
        text = (await http.get("/metrics")).text
    assert metric(text, "tokenfleet:requests_throttled_total", cause="backlog") == 1
    assert metric(text, "tokenfleet:requests_throttled_total", cause="rate_limit") == 1
    assert metric(text, "tokenfleet:gateway_requests_total", kind="completion") == 3
    assert metric(text, "tokenfleet:http_requests_total", route="/v1/jobs",
                  status="429") == 2
    assert metric(text, "tokenfleet:queue_depth_requests", model_name="tiny",
                  lane="interactive") == 3


async def test_fleet_endpoint_needs_a_key_and_the_dashboard_does_not(redis_url: str) -> None:
    settings = settings_for(redis_url, auth=True, api_keys=[API_KEY])
    async with gateway_client(settings) as (http, _):
        assert (await http.get("/v1/fleet")).status_code == 401
        ok = await http.get("/v1/fleet", headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200 and ok.json()["object"] == "fleet"
        page = await http.get("/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        for src in ("/dashboard/dashboard.js", "/dashboard/vendor/uplot/uPlot.iife.min.js",
                    "/dashboard/vendor/uplot/uPlot.min.css", "/dashboard/vendor/uplot/LICENSE"):
            assert src.rsplit("/", 1)[1] in page.text or src.endswith("LICENSE")
            assert (await http.get(src)).status_code == 200, src
        assert (await http.get("/dashboard/../app.py")).status_code == 404
        assert (await http.get("/dashboard/nope.js")).status_code == 404
        assert "//" not in page.text.replace("<!doctype", "")  # no CDN, no other origin
