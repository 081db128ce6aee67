"""GET /: the playground, one static HTML page (inline CSS and JS, no build step) that calls
the public API (/v1/models, /v1/rerank) from the browser like any other client."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@cache
def _page() -> str:
    return (resources.files("rerankd") / "static" / "playground.html").read_text(encoding="utf-8")


@router.get("/", include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})
