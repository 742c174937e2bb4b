"""The viewer's web application: one static page and a JSON API (Starlette).

Routes: ``GET /`` (the page), ``GET /api/info``, ``POST /api/slice``, ``POST /api/explain``,
``POST /api/upload`` (a mask, raw bytes), ``POST /api/export`` (a file of a request's map),
``POST /api/estimate`` (the cost of gradient-free methods), ``POST /api/cancel`` (the page's
pending request). A refused request answers 400 (413 for an oversized upload, 409 for a request
superseded by a newer one of the same page) with ``{"error": message}``; the server keeps
running. Computing requests run in worker threads: slices and info are answered meanwhile.
Nothing but the page and its one script (``viewer.js``) is served from disk.

Only the user's own browser can use a served viewer (:func:`segcam.apps.viewer.serve.serve`
passes ``token`` and ``port``):

- the ``Host`` header must name the loopback address the server listens on, with its port
  (127.0.0.1, localhost or [::1]): a page of another site whose name resolves to 127.0.0.1
  (DNS rebinding) is refused (421);
- every request carries the session's random token (``?token=`` in the URL printed at start,
  as Jupyter does, then the ``X-Segcam-Token`` header the page sends): without it, 403;
- a POST must be ``application/json`` (``application/octet-stream`` for uploads), 415 otherwise,
  so a cross-site form cannot send one; an ``Origin`` other than the server's own, or a
  ``Sec-Fetch-Site`` of another site, is refused (403);
- every response forbids framing (``X-Frame-Options: DENY``, CSP ``frame-ancestors 'none'``),
  loads nothing from elsewhere (CSP ``default-src 'self'``), and sends no referrer;
- no inline script runs (CSP ``script-src 'self'``: only ``viewer.js``), and the page puts
  every string that comes from a model, a file or the command line (class and layer names,
  titles) into text nodes, never into markup: a class named ``<img src=x onerror=...>`` in a
  model folder's ``dataset.json`` shows as those characters and runs nothing.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from segcam.apps.viewer.session import RequestError, SupersededError, ViewerSession
from segcam.errors import SegCamError

__all__ = ["create_app"]

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
SCRIPT = PAGE.with_name("viewer.js")  # the page's one script: no inline script runs
MAX_JSON_BYTES = 64 * 2**20  # a painted 3D slice is at most a few MB of base64
TOKEN_HEADER = "x-segcam-token"
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' "
        "'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}
BODY_TYPES = {"/api/upload": "application/octet-stream"}  # other POSTs: application/json


def new_token() -> str:
    """A random per-session access token (32 URL-safe characters)."""
    return secrets.token_urlsafe(24)


class _RefusedError(SegCamError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _check_request(request: Request, token: str | None, hosts: frozenset[str] | None) -> None:
    """Refuse a request from anything but the user's own page (see the module docstring)."""
    if hosts is not None:
        host = request.headers.get("host", "").lower()
        if host not in hosts:
            raise _RefusedError(
                421, f"this viewer answers only to {sorted(hosts)[0]}; the Host {host!r} is not it"
            )
    if token is not None:
        given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise _RefusedError(
                403,
                "this viewer needs its access token: open the address `segcam view` printed "
                "(it ends in ?token=...)",
            )
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise _RefusedError(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
    origin = request.headers.get("origin")
    if origin is not None and hosts is not None:
        allowed = {f"http://{h}" for h in hosts}
        if origin.lower() not in allowed:
            raise _RefusedError(403, f"cross-origin request refused (Origin: {origin})")
    if request.method == "POST":
        wanted = BODY_TYPES.get(request.url.path, "application/json")
        given_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if given_type != wanted:
            raise _RefusedError(
                415, f"{request.url.path} takes {wanted}, not {given_type or 'nothing'}"
            )


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
    token: str | None = None,
    hosts: frozenset[str] | None = None,
) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        try:
            _check_request(request, token, hosts)
            response = await handler(request)
        except _RefusedError as error:
            response = _error(str(error), error.status)
        except Exception as error:
            response = _failure(error)
        response.headers.update(SECURITY_HEADERS)
        return response

    return run


def _failure(error: Exception) -> Response:
    """One JSON answer for an error of a handler; the server keeps running."""
    if isinstance(error, _TooLargeError):
        return _error(str(error), 413)
    if isinstance(error, SupersededError):
        return JSONResponse({"error": str(error), "superseded": True}, status_code=409)
    if isinstance(error, RequestError | SegCamError):
        return _error(str(error))
    if isinstance(error, json.JSONDecodeError):
        return _error(f"the request is not valid JSON: {error}")
    if isinstance(error, RecursionError):
        return _error("the request is nested too deeply")
    return _error(f"internal error: {type(error).__name__}: {error}", 500)


def allowed_hosts(port: int, host: str = "127.0.0.1") -> frozenset[str]:
    """The Host headers a viewer on ``host:port`` answers: loopback names, or the bound host."""
    names = {*LOOPBACK, host if ":" not in host else f"[{host}]"}
    return frozenset(f"{name}:{port}" for name in names)


def create_app(
    session: ViewerSession, *, token: str | None = None, hosts: frozenset[str] | None = None
) -> Starlette:
    """The application serving ``session``.

    Args:
        session: what to serve.
        token: the access token every request must carry (``None``: none, for tests in-process).
        hosts: the accepted ``Host`` headers (``None``: any; :func:`allowed_hosts` for a server).
    """
    page = PAGE.read_text(encoding="utf-8")
    script = SCRIPT.read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def viewer_script(request: Request) -> Response:
        # the same for every session and holding no data: no token (a <script src> cannot send
        # it), but the Host check as everywhere
        return Response(script, media_type="text/javascript", headers={"Cache-Control": "no-store"})

    async def info(request: Request) -> Response:
        return JSONResponse(session.info())

    async def payload(request: Request) -> dict[str, Any]:
        body = await _body(request, MAX_JSON_BYTES) or b"{}"
        try:
            data = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError("the request body is not UTF-8 text") from None
        except RecursionError:
            raise RequestError("the request is nested too deeply") from None
        except ValueError as error:  # not JSON, or an integer of thousands of digits
            raise RequestError(f"the request is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise RequestError("the request must be a JSON object")
        return data

    async def slice_(request: Request) -> Response:
        data = await payload(request)
        return JSONResponse(await run_in_threadpool(session.slice, data))

    async def explain(request: Request) -> Response:
        data = await payload(request)
        return JSONResponse(await run_in_threadpool(session.explain, data))

    async def estimate(request: Request) -> Response:
        data = await payload(request)
        return JSONResponse(await run_in_threadpool(session.estimate, data))

    async def cancel(request: Request) -> Response:
        data = await payload(request)
        return JSONResponse(session.cancel(data))

    async def upload(request: Request) -> Response:
        data = await _body(request, session.max_upload_bytes)
        client = request.query_params.get("client", "")  # the body is the file: the page's id here
        return JSONResponse(await run_in_threadpool(session.upload_mask, data, client))

    async def export(request: Request) -> Response:
        data = await payload(request)
        content, media, name = await run_in_threadpool(session.export, data)
        return Response(
            content,
            media_type=media,
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    def guard(handler: Callable[[Request], Awaitable[Response]]) -> Any:
        return _guarded(handler, token, hosts)

    routes = [
        Route("/", guard(index)),
        Route("/viewer.js", _guarded(viewer_script, None, hosts)),
        Route("/api/info", guard(info)),
        Route("/api/slice", guard(slice_), methods=["POST"]),
        Route("/api/explain", guard(explain), methods=["POST"]),
        Route("/api/upload", guard(upload), methods=["POST"]),
        Route("/api/estimate", guard(estimate), methods=["POST"]),
        Route("/api/cancel", guard(cancel), methods=["POST"]),
        Route("/api/export", guard(export), methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_SecurityHeaders)])


class _SecurityHeaders:
    """The security headers on every answer, also Starlette's own 404 and 405."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *(
                        (name.lower().encode(), value.encode())
                        for name, value in SECURITY_HEADERS.items()
                        if name.lower().encode() not in present
                    ),
                ]
            await send(message)

        await self.app(scope, receive, with_headers)
