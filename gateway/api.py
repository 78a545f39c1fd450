"""The OpenAI-compatible surface of the daemon: its handlers and routes.

Every handler gets the request, the process's runtime and the generation the request
is served by (``gateway.edge`` read it once, when the request was made); it uses that
generation for everything the config decides.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from gateway.accesslog import Note
from gateway.edge import GatewayRequest, Route, Routes, request_factory
from gateway.errors import ApiError, json_response
from gateway.generation import Generation
from gateway.plain_body import plain_chat_request
from gateway.routing import StreamBroken
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
from tracking import ApiKey, LedgerUnavailableError

log = structlog.get_logger(__name__)


async def _json_object(request: GatewayRequest, generation: Generation) -> dict[str, Any]:
    """The request's body as a JSON object; 413, 415 or 400 otherwise."""
    limit = generation.config.server.max_body_bytes
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


def _deadline(generation: Generation) -> float:
    return time.monotonic() + generation.config.server.request_timeout_s


async def chat_completions(request: GatewayRequest, rt: Runtime, generation: Generation,
                           note: Note) -> web.StreamResponse:
    raw = await _json_object(request, generation)
    rid = note.request_id
    # Fast path: docs/BENCHMARKS.md "plain chat body without pydantic".
    req = plain_chat_request(raw, rid) or chat_request(_validated(CHAT_BODY, raw), raw, rid)
    key = note.key
    completion_id = f"chatcmpl-{rid}"
    if req.stream:
        return await _stream(request, generation, note, req, key, completion_id)
    served = await generation.router.chat(req, key, _deadline(generation))
    note.tier, note.attempts, note.usage = served.tier, served.attempts, served.result.usage
    return json_response(
        completion_json(req, served.result, completion_id),
        headers={"x-tiergate-tier": served.tier, "x-tiergate-attempts": str(served.attempts)},
    )


async def _stream(request: GatewayRequest, generation: Generation, note: Note, req: Any,
                  key: ApiKey | None, completion_id: str) -> web.StreamResponse:
    served = await generation.router.open_stream(req, key, _deadline(generation))
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


async def embeddings(request: GatewayRequest, rt: Runtime, generation: Generation,
                     note: Note) -> web.StreamResponse:
    raw = await _json_object(request, generation)
    req = embedding_request(_validated(EMBEDDING_BODY, raw), raw, note.request_id)
    served = await generation.router.embed(req, note.key, _deadline(generation))
    note.tier, note.attempts, note.usage = served.tier, served.attempts, served.result.usage
    return json_response(
        embeddings_json(req, served.result),
        headers={"x-tiergate-tier": served.tier, "x-tiergate-attempts": str(served.attempts)},
    )


async def list_models(request: GatewayRequest, rt: Runtime, generation: Generation,
                      note: Note) -> web.StreamResponse:
    key: ApiKey | None = note.key
    created = int(rt.started_at)
    data = []
    for task in ("chat", "embeddings"):
        for name in generation.router.public_models(task):
            if key is None or key.may_use_model(name):
                data.append({"id": name, "object": "model", "created": created, "owned_by": "tiergate"})
    return json_response({"object": "list", "data": data})


async def healthz(request: GatewayRequest, rt: Runtime, generation: Generation,
                  note: Note) -> web.StreamResponse:
    return json_response({"status": "ok"})


async def readyz(request: GatewayRequest, rt: Runtime, generation: Generation,
                 note: Note) -> web.StreamResponse:
    ready, body = rt.readiness(generation)
    return json_response(body, status=200 if ready else 503)


async def admin_usage(request: GatewayRequest, rt: Runtime, generation: Generation,
                      note: Note) -> web.StreamResponse:
    day = request.query.get("day")
    month = request.query.get("month")
    try:
        report = await rt.ledger.report(day=day, month=month)
    except LedgerUnavailableError as exc:
        raise ApiError(503, f"The ledger is unavailable: {exc}", code="ledger_unavailable") from exc
    except ValueError as exc:
        raise ApiError(400, f"Bad day or month: {exc}", code="invalid_request") from exc
    return json_response(report)


async def unrouted(request: GatewayRequest, rt: Runtime, generation: Generation,
                   note: Note) -> web.StreamResponse:
    """Every path and method no route takes: an OpenAI-style 404 or 405."""
    methods = sorted(method for method, path, _, _ in ROUTES if path == request.path)
    if methods:
        raise ApiError(405, f"Method {request.method} not allowed on {request.path}; use {', '.join(methods)}.",
                       code="method_not_allowed", headers={"Allow": ", ".join(methods)})
    raise ApiError(404, "Not found. The API lives under /v1 (see GET /v1/models).", code="not_found")


# (method, path, handler, needs a key)
ROUTES: list[Route] = [
    ("POST", "/v1/chat/completions", chat_completions, True),
    ("POST", "/v1/embeddings", embeddings, True),
    ("GET", "/v1/models", list_models, True),
    ("GET", "/healthz", healthz, False),
    ("GET", "/readyz", readyz, False),
    ("GET", "/admin/usage", admin_usage, True),
]


def build_server(rt: Runtime, **kwargs: Any) -> web.Server:
    """aiohttp's low-level server around ``Routes``; ``kwargs`` go to ``web.Server`` (and
    its protocol: access log, timeouts)."""
    return web.Server(Routes(rt, ROUTES, unrouted), request_factory=request_factory(rt), **kwargs)
