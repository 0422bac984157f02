"""``GET /dashboard``: one static page that polls ``GET /v1/fleet`` (no build step).

The page and its vendored chart library are served from ``gateway/static``; only the files
listed here can be fetched. The page itself carries no data, so it needs no key: when auth
is on it asks for one and sends it with each ``/v1/fleet`` poll.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

router = APIRouter(tags=["dashboard"], include_in_schema=False)

STATIC = Path(__file__).resolve().parents[1] / "static"
ASSETS: dict[str, tuple[Path, str]] = {
    "dashboard.js": (STATIC / "dashboard.js", "text/javascript"),
    "vendor/uplot/uPlot.iife.min.js": (STATIC / "vendor/uplot/uPlot.iife.min.js",
                                       "text/javascript"),
    "vendor/uplot/uPlot.min.css": (STATIC / "vendor/uplot/uPlot.min.css", "text/css"),
    "vendor/uplot/LICENSE": (STATIC / "vendor/uplot/LICENSE", "text/plain"),
}
CACHE = {"Cache-Control": "no-cache"}


@router.get("/dashboard")
async def dashboard() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html", headers=CACHE)


@router.get("/dashboard/{asset:path}")
async def dashboard_asset(asset: str) -> FileResponse:
    found = ASSETS.get(asset)
    if found is None:
        raise HTTPException(404, f"no dashboard file {asset!r}")
    path, media_type = found
    return FileResponse(path, media_type=media_type, headers=CACHE)
