"""The aiohttp application: API routes under /api/v10, the gateway websocket, the
attachment "CDN", plus the cross-cutting parts (request log, auth, error JSON, unknown routes).

The fake never answers 5xx: discord.py retries those with sleeps, which would turn a bug in
the fake into a slow test instead of a clear failure."""

from __future__ import annotations

import time
import traceback
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from aiohttp import web

from . import payloads
from .applications import ApplicationApi
from .bodies import BODY, BadBody, read_body
from .callbacks import InteractionApi
from .gateway import GatewayHub
from .models import RecordedRequest, Rejection
from .rest import RestApi, json_response
from .state import FakeState
from .validation import Refusal

API_PREFIX = "/api/v10"
RECORD = web.RequestKey("record", RecordedRequest)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _needs_bot_token(path: str) -> bool:
    """Interaction callbacks and webhooks authenticate with their token in the URL."""
    return not (path.startswith("/interactions/") or path.startswith("/webhooks/"))


def build_app(state: FakeState, hub: GatewayHub) -> web.Application:
    app = web.Application(middlewares=[_api_middleware(state)], client_max_size=64 * 1024 * 1024)
    routes = [
        *RestApi(state, hub).routes(),
        *InteractionApi(state).routes(),
        *ApplicationApi(state).routes(),
    ]
    for route in routes:
        app.router.add_route(route.method, API_PREFIX + route.path, route.handler)
    app.router.add_get("/gateway", hub.handle)
    app.router.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", _cdn(state))
    app.router.add_route("*", "/{tail:.*}", _unknown_route(state))
    return app


def _api_middleware(
    state: FakeState,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(API_PREFIX + "/"):
            return await handler(request)
        path = request.path[len(API_PREFIX) :]
        record = RecordedRequest(request.method, path, None, time.monotonic())
        state.requests.append(record)
        request[RECORD] = record
        try:
            body = await read_body(request)
            record.body = body.summary()
            request[BODY] = body
            if (
                _needs_bot_token(path)
                and request.headers.get("Authorization") != f"Bot {state.token}"
            ):
                response: web.StreamResponse = json_response(
                    payloads.error(0, "401: Unauthorized"), status=401
                )
            else:
                response = await handler(request)
        except BadBody:
            response = _refuse(
                state,
                record,
                Refusal(400, payloads.error(50109, "The request body contains invalid JSON.")),
            )
        except Refusal as refusal:
            response = _refuse(state, record, refusal)
        except web.HTTPException:
            raise
        except Exception:
            state.problems.errors.append(f"{request.method} {path}:\n{traceback.format_exc()}")
            response = json_response(
                payloads.error(0, "fake Discord crashed on this request; see FakeDiscord.errors"),
                status=400,
            )
        record.status = response.status
        state.changed.notify()
        return response

    return middleware


def _refuse(state: FakeState, record: RecordedRequest, refusal: Refusal) -> web.Response:
    rejection = Rejection(record.method, record.path, refusal.status, refusal.body)
    state.problems.refused.append(rejection)
    if refusal.bot_error:
        state.problems.rejected.append(rejection)
    return json_response(refusal.body, status=refusal.status)


def _unknown_route(state: FakeState) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        record = request.get(RECORD)
        if record is None:  # outside the API prefix, so the middleware did not log it
            record = RecordedRequest(request.method, request.path, None, time.monotonic())
            state.requests.append(record)
        state.problems.unknown_routes.append(record)
        return json_response(payloads.error(0, "404: Not Found"), status=404)

    return handler


def _cdn(state: FakeState) -> Handler:
    """Serve uploaded attachments back, as cdn.discordapp.com would."""

    async def handler(request: web.Request) -> web.StreamResponse:
        record = RecordedRequest(request.method, request.path, None, time.monotonic(), 404)
        state.requests.append(record)  # so a test can tell whether the bot downloaded a file
        attachment = state.attachments.get(int(request.match_info["attachment_id"]))
        if attachment is None or unquote(request.match_info["filename"]) != attachment.filename:
            return web.Response(status=404, text="Not Found")
        record.status = 200
        return web.Response(
            body=attachment.data, content_type=attachment.content_type or "application/octet-stream"
        )

    return handler
