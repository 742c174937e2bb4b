"""The viewer's web application: one static page and a JSON API (Starlette).

Routes: ``GET /`` (the page), ``GET /api/info``, ``POST /api/slice``, ``POST /api/explain``,
``POST /api/upload`` (a mask, raw bytes), ``GET /api/export?format=&method=``. A refused request
answers 400 (413 for an oversized upload) with ``{"error": message}``; the server keeps running.
Nothing but the page itself is served from disk.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from segcam.apps.viewer.session import RequestError, ViewerSession
from segcam.errors import SegCamError

__all__ = ["create_app"]

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
MAX_JSON_BYTES = 64 * 2**20  # a painted 3D slice is at most a few MB of base64


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLargeError(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLargeError(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


class _TooLargeError(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the request body ({size} bytes or more) is over the limit of {limit}")


def _guarded(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except _TooLargeError as error:
            return _error(str(error), 413)
        except (RequestError, SegCamError) as error:
            return _error(str(error))
        except json.JSONDecodeError as error:
            return _error(f"the request is not valid JSON: {error}")
        except Exception as error:  # shown in the page; the server keeps running
            return _error(f"internal error: {type(error).__name__}: {error}", 500)

    return run


def create_app(session: ViewerSession) -> Starlette:
    """The application serving ``session``."""
    page = PAGE.read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def info(request: Request) -> Response:
        return JSONResponse(session.info())

    async def payload(request: Request) -> dict[str, Any]:
        data = json.loads(await _body(request, MAX_JSON_BYTES) or b"{}")
        if not isinstance(data, dict):
            raise RequestError("the request must be a JSON object")
        return data

    async def slice_(request: Request) -> Response:
        data = await payload(request)
        return JSONResponse(await run_in_threadpool(session.slice, data))

    async def explain(request: Request) -> Response:
        data = await payload(request)
        return JSONResponse(await run_in_threadpool(session.explain, data))

    async def upload(request: Request) -> Response:
        data = await _body(request, session.max_upload_bytes)
        return JSONResponse(await run_in_threadpool(session.upload_mask, data))

    async def export(request: Request) -> Response:
        kind = request.query_params.get("format", "npz")
        method = request.query_params.get("method", "")
        content, media, name = await run_in_threadpool(session.export, kind, method)
        return Response(
            content,
            media_type=media,
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    routes = [
        Route("/", _guarded(index)),
        Route("/api/info", _guarded(info)),
        Route("/api/slice", _guarded(slice_), methods=["POST"]),
        Route("/api/explain", _guarded(explain), methods=["POST"]),
        Route("/api/upload", _guarded(upload), methods=["POST"]),
        Route("/api/export", _guarded(export)),
    ]
    return Starlette(routes=routes)
