"""The gateway app in-process with an HTTP client bound to it, and an SSE body parser."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from gateway.app import create_app
from shared.settings import Settings


@contextlib.asynccontextmanager
async def gateway_client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """The app in-process (lifespan run explicitly) and an HTTP client bound to it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app


def parse_sse(body: str) -> list[tuple[str | None, str]]:
    """``(event name or None, data)`` for each event of a ``text/event-stream`` body."""
    events = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        events.append((name, "\n".join(data)))
    return events
