"""HTTP handlers and the edge around them: the OpenAI-compatible surface of the daemon."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import HttpVersion11, web
from pydantic import TypeAdapter, ValidationError

from gateway.accesslog import GatewayRequest, Note
from gateway.errors import ApiError, json_response
from gateway.routing import RoutingError, StreamBroken
from gateway.runtime import Runtime
from gateway.wire import (
    CHAT_BODY,
    EMBEDDING_BODY,
    ChunkWriter,
    chat_request,
    completion_json,
    embedding_request,
    embeddings_json,
    loads,
)
from gateway.plain_body import plain_chat_request
from providers.errors import FatalError
from tracking import ApiKey, LedgerUnavailableError, new_event_id

log = structlog.get_logger(__name__)

# A route's handler: the request, the daemon's runtime and the request's note.
Handler = Callable[[web.BaseRequest, Runtime, Note], Awaitable[web.StreamResponse]]


def _note(request: web.BaseRequest) -> Note:
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable():
        return Note(given, client_chose_id=True)
    return Note(new_event_id())  # unique, 32 hex digits, no system call


def _on_unix_socket(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is not None and isinstance(transport.get_extra_info("sockname"), str)


def _authenticate(request: web.BaseRequest, rt: Runtime) -> ApiKey | None:
    """The caller's key, None for a trusted Unix socket; ApiError 401/403 otherwise.
    Only called when keys are configured (``edge`` skips it otherwise)."""
    if rt.config.server.trust_unix_socket and _on_unix_socket(request):
        return None
    admin_path = request.path.startswith("/admin/")
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Missing API key: send Authorization: Bearer <key>.",
                       code="missing_api_key", type_="invalid_request_error")
    key = rt.keys.lookup(token.strip())
    if key is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key",
                       type_="invalid_request_error")
    if admin_path and not key.admin:
        raise ApiError(403, "This endpoint needs an admin key.", code="admin_required")
    return key


def edge(
    handler: Handler, rt: Runtime, *, auth: bool = True
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """Wrap a route's handler: request id, authentication (unless ``auth`` is off or no
    key is configured) and OpenAI-style errors (the handler's own, a routing failure, a
    tier's client error). A wrapper per route rather than an aiohttp middleware: the
    middleware chain is rebuilt on every request. The access line is written by
    ``gateway.accesslog`` once the response is sent."""

    keys = rt.keys

    async def wrapped(request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        note = request.note = _note(request)  # type: ignore[attr-defined]
        try:
            if auth and not keys.empty:
                note.key = _authenticate(request, rt)
            resp = await handler(request, rt, note)
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
    paths and methods never raise one: ``unrouted`` answers them.)"""
    if exc.status == 413:
        err = ApiError(413, "Request body too large.", code="request_too_large")
    else:
        err = ApiError(exc.status, exc.reason or "error", code=f"http_{exc.status}")
    return err.response()


async def _json_object(request: web.BaseRequest, rt: Runtime) -> dict[str, Any]:
    """The request's body as a JSON object; 413, 415 or 400 otherwise."""
    limit = rt.config.server.max_body_bytes
    if request.headers.get("Content-Type") != "application/json":  # else parse it
        ctype = request.content_type
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise ApiError(415, f"Content-Type must be application/json, not {ctype or 'missing'}.",
                           code="unsupported_media_type")
    try:  # read() stops at the limit (a Content-Length over it included)
        raw_bytes = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(413, f"Request body exceeds the limit of {limit} bytes.",
                       code="request_too_large") from exc
    try:
        raw = loads(raw_bytes)
    except ValueError as exc:
        raise ApiError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from exc
    if type(raw) is not dict:
        raise ApiError(400, "Request body must be a JSON object.", code="invalid_json")
    return raw  # type: ignore[no-any-return]


def _validated(schema: TypeAdapter[Any], raw: dict[str, Any]) -> Any:
    """``raw``'s known fields checked by ``schema``; a 400 naming the first bad one."""
    try:
        return schema.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        msg = first["msg"]
        if first["type"] == "missing":
            msg = f"'{param}' is a required property"
        elif param:
            msg = f"Invalid value for '{param}': {msg}"
        raise ApiError(400, msg, code="invalid_request", param=param) from exc


def _deadline(rt: Runtime) -> float:
    return time.monotonic() + rt.config.server.request_timeout_s


async def chat_completions(request: web.BaseRequest, rt: Runtime, note: Note) -> web.StreamResponse:
    raw = await _json_object(request, rt)
    rid = note.request_id
    req = plain_chat_request(raw, rid) or chat_request(_validated(CHAT_BODY, raw), raw, rid)
    key = note.key
    completion_id = f"chatcmpl-{rid}"
    if req.stream:
        return await _stream(request, rt, note, req, key, completion_id)
    served = await rt.router.chat(req, key, _deadline(rt))
    note.tier, note.attempts, note.usage = served.tier, served.attempts, served.result.usage
    return json_response(
        completion_json(req, served.result, completion_id),
        headers={"x-tiergate-tier": served.tier, "x-tiergate-attempts": str(served.attempts)},
    )


async def _stream(request: web.BaseRequest, rt: Runtime, note: Note, req: Any, key: ApiKey | None,
                  completion_id: str) -> web.StreamResponse:
    served = await rt.router.open_stream(req, key, _deadline(rt))
    writer = ChunkWriter(req, completion_id)
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "x-tiergate-tier": served.tier,
            "x-tiergate-attempts": str(served.attempts),
            "x-request-id": note.request_id,
        }
    )
    note.tier = served.tier
    try:
        await resp.prepare(request)
        try:
            async for chunk in served:
                await resp.write(writer.chunk(chunk))
        except StreamBroken as exc:
            log.warning("stream_broken", request_id=note.request_id, tier=exc.tier,
                        reason=exc.message)
            await resp.write(writer.error(exc.message, code="upstream_stream_broken"))
            return resp
        if req.include_usage:
            await resp.write(writer.usage(served.usage_total))
        await resp.write(writer.DONE)
        await resp.write_eof()
    except ConnectionError:
        # The client is gone: stop reading the upstream (finally) and let aiohttp
        # finish; the access line says 499.
        note.client_gone = True
    finally:
        await served.aclose()
        note.tier = "+".join(served.tiers_used)
        note.attempts = served.attempts
        note.usage = served.usage_total
    return resp


async def embeddings(request: web.BaseRequest, rt: Runtime, note: Note) -> web.StreamResponse:
    raw = await _json_object(request, rt)
    req = embedding_request(_validated(EMBEDDING_BODY, raw), raw, note.request_id)
    served = await rt.router.embed(req, note.key, _deadline(rt))
    note.tier, note.attempts, note.usage = served.tier, served.attempts, served.result.usage
    return json_response(
        embeddings_json(req, served.result),
        headers={"x-tiergate-tier": served.tier, "x-tiergate-attempts": str(served.attempts)},
    )


async def list_models(request: web.BaseRequest, rt: Runtime, note: Note) -> web.StreamResponse:
    key: ApiKey | None = note.key
    created = int(rt.started_at)
    data = []
    for task in ("chat", "embeddings"):
        for name in rt.router.public_models(task):
            if key is None or key.may_use_model(name):
                data.append({"id": name, "object": "model", "created": created, "owned_by": "tiergate"})
    return json_response({"object": "list", "data": data})


async def healthz(request: web.BaseRequest, rt: Runtime, note: Note) -> web.StreamResponse:
    return json_response({"status": "ok"})


async def readyz(request: web.BaseRequest, rt: Runtime, note: Note) -> web.StreamResponse:
    ready, body = rt.readiness()
    return json_response(body, status=200 if ready else 503)


async def admin_usage(request: web.BaseRequest, rt: Runtime, note: Note) -> web.StreamResponse:
    day = request.query.get("day")
    month = request.query.get("month")
    try:
        report = await rt.ledger.report(day=day, month=month)
    except LedgerUnavailableError as exc:
        raise ApiError(503, f"The ledger is unavailable: {exc}", code="ledger_unavailable") from exc
    except ValueError as exc:
        raise ApiError(400, f"Bad day or month: {exc}", code="invalid_request") from exc
    return json_response(report)


async def declared_too_large(request: web.BaseRequest, rt: Runtime, note: Note) -> web.StreamResponse:
    """A body announced (``Expect: 100-continue``) over the limit: refused before it is
    sent. The connection closes, as the client may send the body anyway."""
    limit = rt.config.server.max_body_bytes
    resp = ApiError(413, f"Request body is {request.content_length} bytes; the limit is {limit}.",
                    code="request_too_large").response()
    resp.force_close()
    return resp


async def unrouted(request: web.BaseRequest, rt: Runtime, note: Note) -> web.StreamResponse:
    """Every path and method no route takes: an OpenAI-style 404 or 405."""
    methods = sorted(method for method, path, _, _ in ROUTES if path == request.path)
    if methods:
        raise ApiError(405, f"Method {request.method} not allowed on {request.path}; use {', '.join(methods)}.",
                       code="method_not_allowed", headers={"Allow": ", ".join(methods)})
    raise ApiError(404, "Not found. The API lives under /v1 (see GET /v1/models).", code="not_found")


# (method, path, handler, needs a key)
ROUTES: list[tuple[str, str, Handler, bool]] = [
    ("POST", "/v1/chat/completions", chat_completions, True),
    ("POST", "/v1/embeddings", embeddings, True),
    ("GET", "/v1/models", list_models, True),
    ("GET", "/healthz", healthz, False),
    ("GET", "/readyz", readyz, False),
    ("GET", "/admin/usage", admin_usage, True),
]


class Routes:
    """The daemon's request handler: ``(method, path)`` to its wrapped handler, anything
    else to ``unrouted`` (404 or 405). A table rather than ``web.Application``'s router:
    the API is a handful of fixed paths, and resolving, match info and middleware
    handling cost every request a few microseconds for nothing here."""

    def __init__(self, rt: Runtime) -> None:
        self._table = {(method, path): edge(handler, rt, auth=auth) for method, path, handler, auth in ROUTES}
        self._unrouted = edge(unrouted, rt, auth=False)
        self._limit = rt.config.server.max_body_bytes
        self._declared_too_large = edge(declared_too_large, rt, auth=False)

    def __call__(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        handler = self._table.get((request.method, request.path), self._unrouted)
        if "Expect" in request.headers:
            return self._after_expect(request, handler)
        return handler(request)  # type: ignore[arg-type]

    async def _after_expect(
        self, request: web.BaseRequest, handler: Callable[[Any], Awaitable[web.StreamResponse]]
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
        if length is not None and length > self._limit:
            return await self._declared_too_large(request)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's size starts after the interim line
        return await handler(request)


def build_server(rt: Runtime, **kwargs: Any) -> web.Server:
    """aiohttp's low-level server around ``Routes``; ``kwargs`` go to ``web.Server`` (and
    its protocol: access log, timeouts). Requests get the configured body limit."""
    limit = rt.config.server.max_body_bytes

    def request_factory(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        return GatewayRequest(message, payload, protocol, writer, task, protocol._loop,
                              client_max_size=limit)

    return web.Server(Routes(rt), request_factory=request_factory, **kwargs)
