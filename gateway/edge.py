"""The HTTP edge around every handler: the generation a request is served by, its id,
authentication, ``Expect: 100-continue``, and OpenAI-style errors.

Each request reads the runtime's current generation once, when aiohttp creates it
(``request_factory``: the generation's body limit applies to it), and keeps it: the
edge and the handler use that one, so a swap mid-request changes nothing for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import HttpVersion11, web

from gateway.accesslog import Note
from gateway.errors import ApiError, json_response
from gateway.generation import Generation
from gateway.routing import RoutingError
from gateway.runtime import Runtime
from providers.errors import FatalError
from tracking import ApiKey, new_event_id


class GatewayRequest(web.BaseRequest):
    """The daemon's request: aiohttp's, plus the generation serving it and the note the
    edge makes for it (plain attributes, set once per request)."""

    generation: Generation
    note: Note | None = None


# A route's handler: the request, the process's runtime, the request's generation, and
# the request's note (for its access line).
Handler = Callable[[GatewayRequest, Runtime, Generation, Note], Awaitable[web.StreamResponse]]
# (method, path, handler, needs a key)
Route = tuple[str, str, Handler, bool]


def request_factory(rt: Runtime) -> Callable[..., GatewayRequest]:
    """aiohttp's hook that makes each request: here it reads the current generation.
    Call it in the loop that will serve."""
    loop = asyncio.get_running_loop()

    def make(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> GatewayRequest:
        generation = rt.generation
        request = GatewayRequest(message, payload, protocol, writer, task, loop,
                                 client_max_size=generation.config.server.max_body_bytes)
        request.generation = generation
        return request

    return make


def _note(request: web.BaseRequest) -> Note:
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable():
        return Note(given, client_chose_id=True)
    return Note(new_event_id())  # unique, 32 hex digits, no system call


def _on_unix_socket(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is not None and isinstance(transport.get_extra_info("sockname"), str)


def _authenticate(request: web.BaseRequest, generation: Generation) -> ApiKey | None:
    """The caller's key, None for a trusted Unix socket; ApiError 401/403 otherwise.
    Only called when keys are configured (``edge`` skips it otherwise)."""
    if generation.config.server.trust_unix_socket and _on_unix_socket(request):
        return None
    admin_path = request.path.startswith("/admin/")
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Missing API key: send Authorization: Bearer <key>.",
                       code="missing_api_key", type_="invalid_request_error")
    key = generation.keys.lookup(token.strip())
    if key is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key",
                       type_="invalid_request_error")
    if admin_path and not key.admin:
        raise ApiError(403, "This endpoint needs an admin key.", code="admin_required")
    return key


def edge(handler: Handler, rt: Runtime, *, auth: bool = True) -> Callable[[GatewayRequest], Awaitable[web.StreamResponse]]:
    """Wrap a route's handler: request id, authentication (unless ``auth`` is off or no
    key is configured) and OpenAI-style errors (the handler's own, a routing failure, a
    tier's client error). Fast path: docs/BENCHMARKS.md "edge as a per-route wrapper"
    (aiohttp rebuilds its middleware chain on every request). The access line is written by
    ``gateway.accesslog`` once the response is sent."""

    async def wrapped(request: GatewayRequest) -> web.StreamResponse:
        started = time.monotonic()
        generation = request.generation
        note = request.note = _note(request)
        try:
            if auth and not generation.keys.empty:
                note.key = _authenticate(request, generation)
            resp = await handler(request, rt, generation, note)
        except ApiError as exc:
            resp = exc.response()
        except RoutingError as exc:
            note.attempts = exc.attempts
            resp = ApiError(exc.status, exc.message, code=exc.code, type_=exc.type,
                            headers=exc.headers).response()
        except FatalError as exc:  # the client's request at fault, as the tier said
            resp = json_response(exc.body, status=exc.status or 400)
        except web.HTTPException as exc:
            resp = _http_exception(exc)
        except asyncio.CancelledError:
            # The client hung up (aiohttp cancels the handler) and aiohttp writes no
            # access line for a cancelled handler: write it here.
            note.client_gone = True
            rt.access_log.request(request, 0, time.monotonic() - started)
            raise
        if not resp.prepared:
            resp.headers["x-request-id"] = note.request_id
        return resp

    return wrapped


def _http_exception(exc: web.HTTPException) -> web.Response:
    """An aiohttp HTTP exception from inside a handler, in the OpenAI shape. (Unknown
    paths and methods never raise one: the routes' ``unrouted`` answers them.)"""
    if exc.status == 413:
        err = ApiError(413, "Request body too large.", code="request_too_large")
    else:
        err = ApiError(exc.status, exc.reason or "error", code=f"http_{exc.status}")
    return err.response()


async def declared_too_large(request: GatewayRequest, rt: Runtime, generation: Generation,
                             note: Note) -> web.StreamResponse:
    """A body announced (``Expect: 100-continue``) over the limit: refused before it is
    sent. The connection closes, as the client may send the body anyway."""
    limit = generation.config.server.max_body_bytes
    resp = ApiError(413, f"Request body is {request.content_length} bytes; the limit is {limit}.",
                    code="request_too_large").response()
    resp.force_close()
    return resp


class Routes:
    """The daemon's request handler: ``(method, path)`` to its wrapped handler, anything
    else to ``unrouted`` (404 or 405).

    Fast path: docs/BENCHMARKS.md "route table instead of web.Application" (the API is a
    handful of fixed paths; resolving, match info and middleware cost every request a
    few microseconds for nothing here)."""

    def __init__(self, rt: Runtime, routes: Sequence[Route], unrouted: Handler) -> None:
        self._table = {(method, path): edge(handler, rt, auth=auth) for method, path, handler, auth in routes}
        self._unrouted = edge(unrouted, rt, auth=False)
        self._declared_too_large = edge(declared_too_large, rt, auth=False)

    def __call__(self, request: GatewayRequest) -> Awaitable[web.StreamResponse]:
        handler = self._table.get((request.method, request.path), self._unrouted)
        if "Expect" in request.headers:
            return self._after_expect(request, handler)
        return handler(request)

    async def _after_expect(
        self, request: GatewayRequest, handler: Callable[[GatewayRequest], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """``Expect: 100-continue`` (curl sends it with a large body) gets its interim
        answer before the body is read, unless the declared body is over the limit: then
        a 413 at once, and the client never sends it. Any other expectation is refused,
        as aiohttp's router does."""
        expect = request.headers.get("Expect", "")
        if request.version != HttpVersion11:
            return await handler(request)
        if expect.lower() != "100-continue":
            return ApiError(417, f"Unknown Expect: {expect}", code="expectation_failed").response()
        length = request.content_length
        if length is not None and length > request.generation.config.server.max_body_bytes:
            return await self._declared_too_large(request)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's size starts after the interim line
        return await handler(request)
