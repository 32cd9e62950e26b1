"""The gateway websocket: HELLO, IDENTIFY → READY + GUILD_CREATE, heartbeats, and
dispatching events with increasing sequence numbers.

One writer task per connection sends everything in order, which both keeps sequence
numbers ordered on the wire and lets a zlib-stream share one compressor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from . import payloads
from .models import FakeMessage

if TYPE_CHECKING:
    from .state import FakeState


class Intent:
    GUILDS = 1 << 0
    GUILD_MESSAGES = 1 << 9
    DIRECT_MESSAGES = 1 << 12
    MESSAGE_CONTENT = 1 << 15


class Op:
    DISPATCH = 0
    HEARTBEAT = 1
    IDENTIFY = 2
    HELLO = 10
    HEARTBEAT_ACK = 11


@dataclass
class GatewayClose:
    """A websocket that ended; `by_client` tells who closed it."""

    code: int | None
    at: float
    by_client: bool


@dataclass
class GatewaySession:
    """What an IDENTIFY started: the bot's intents and the sequence of dispatched events."""

    id: str
    intents: int
    seq: int = 0
    connection: GatewayConnection | None = None


class GatewayConnection:
    """One websocket, with its own outbox and (optional) zlib-stream compressor."""

    def __init__(self, ws: web.WebSocketResponse, compress: str | None) -> None:
        self.ws = ws
        self.session: GatewaySession | None = None
        self.server_closing = False
        self._zlib = zlib.compressobj() if compress == "zlib-stream" else None
        self._outbox: asyncio.Queue[tuple[dict[str, Any] | None, asyncio.Future[float] | None]]
        self._outbox = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop(), name="fake-discord-gateway-writer")

    def enqueue(self, payload: dict[str, Any]) -> asyncio.Future[float]:
        """Queue a frame; the future gives the monotonic time it was written."""
        sent: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._outbox.put_nowait((payload, sent))
        return sent

    async def _write_loop(self) -> None:
        while True:
            payload, sent = await self._outbox.get()
            if payload is None:  # a flush marker
                if sent is not None and not sent.done():
                    sent.set_result(time.monotonic())
                continue
            try:
                text = json.dumps(payload, separators=(",", ":"))
                if self._zlib is not None:
                    frame = self._zlib.compress(text.encode()) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
                    await self.ws.send_bytes(frame)
                else:
                    await self.ws.send_str(text)
            except Exception as exc:  # socket gone: nobody will read the rest
                _fail(sent, ConnectionError(f"gateway send failed: {exc!r}"))
                continue
            if sent is not None and not sent.done():
                sent.set_result(time.monotonic())

    async def close(self, code: int, message: str = "") -> None:
        self.server_closing = True
        await self.flush()
        await self.ws.close(code=code, message=message.encode())

    async def flush(self) -> None:
        """Wait until everything queued so far is on the wire."""
        if self._writer.done():
            return
        marker: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._outbox.put_nowait((None, marker))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(marker, 5)

    def stop(self) -> None:
        """End the writer; frames still queued will never be sent."""
        self._writer.cancel()
        while not self._outbox.empty():
            _, sent = self._outbox.get_nowait()
            _fail(sent, ConnectionError("the gateway connection closed"))


def _fail(future: asyncio.Future[float] | None, error: Exception) -> None:
    """Fail a "sent" future without an "exception never retrieved" warning if nobody waits."""
    if future is not None and not future.done():
        future.set_exception(error)
        future.exception()


class GatewayHub:
    """The gateway side of the fake: the aiohttp websocket handler plus event dispatch."""

    def __init__(self, state: FakeState, heartbeat_interval_ms: int) -> None:
        self.state = state
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.ready = asyncio.Event()
        self.heartbeats: list[float] = []
        self.closes: list[GatewayClose] = []
        self.identifies: list[dict[str, Any]] = []
        self.connects: list[dict[str, str]] = []  # query string of each websocket opened
        self.session: GatewaySession | None = None
        self._connections: set[GatewayConnection] = set()

    @property
    def url(self) -> str:
        return self.state.base_url.replace("http://", "ws://", 1) + "/gateway"

    # ---- websocket handler ------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.connects.append(dict(request.query))
        ws = web.WebSocketResponse(autoclose=True, max_msg_size=0, compress=False)
        await ws.prepare(request)
        compress = request.query.get("compress")
        # zstd-stream needs a zstd library; discord.py also reads plain text frames.
        conn = GatewayConnection(ws, "zlib-stream" if compress == "zlib-stream" else None)
        self._connections.add(conn)
        try:
            hello = {
                "heartbeat_interval": self.heartbeat_interval_ms,
                "_trace": ['["gateway-fake-1",{"micros":0}]'],
            }
            conn.enqueue(self._op(Op.HELLO, hello))
            await self._read_loop(conn)
        finally:
            self._connection_ended(conn)
        return ws

    async def _read_loop(self, conn: GatewayConnection) -> None:
        async for message in conn.ws:
            if message.type is WSMsgType.TEXT:
                await self._on_frame(conn, json.loads(message.data))

    def _connection_ended(self, conn: GatewayConnection) -> None:
        self._connections.discard(conn)
        conn.stop()
        self.closes.append(
            GatewayClose(conn.ws.close_code, time.monotonic(), by_client=not conn.server_closing)
        )
        if conn.session is not None and conn.session.connection is conn:
            conn.session.connection = None
            self.ready.clear()
        self.state.changed.notify()

    async def _on_frame(self, conn: GatewayConnection, frame: dict[str, Any]) -> None:
        op, data = frame.get("op"), frame.get("d")
        if op == Op.HEARTBEAT:
            self.heartbeats.append(time.monotonic())
            conn.enqueue(self._op(Op.HEARTBEAT_ACK, None))
            self.state.changed.notify()
        elif op == Op.IDENTIFY:
            await self._identify(conn, data or {})
        else:
            await conn.close(4001, "Unknown opcode.")

    async def _identify(self, conn: GatewayConnection, data: dict[str, Any]) -> None:
        if data.get("token") != self.state.token:
            await conn.close(4004, "Authentication failed.")
            return
        self.identifies.append(data)
        session = GatewaySession(secrets.token_hex(16), data["intents"])
        if self.session is not None and self.session.connection is not None:
            await self.session.connection.close(4000, "New session")
        self.session = session
        session.connection = conn
        conn.session = session
        ready = {
            "v": 10,
            "user": payloads.current_user(self.state.bot_user),
            "user_settings": {},
            "session_type": "normal",
            "session_id": session.id,
            "resume_gateway_url": self.url,
            "relationships": [],
            "private_channels": [],
            "presences": [],
            "guilds": [{"id": str(g), "unavailable": True} for g in self.state.guilds],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": ["fake"],
            "auth": {},
            "application": {
                "id": str(self.state.application_id),
                "flags": self.state.application_flags,
            },
            "_trace": ['["gateway-fake-1",{"micros":0}]'],
        }
        sent = [self._dispatch(session, "READY", ready)]
        if session.intents & Intent.GUILDS:
            for guild in self.state.guilds.values():
                sent.append(
                    self._dispatch(
                        session, "GUILD_CREATE", payloads.guild_create(self.state, guild)
                    )
                )
        with contextlib.suppress(ConnectionError):
            await asyncio.gather(*sent)
            self.ready.set()
            self.state.changed.notify()

    # ---- dispatch ---------------------------------------------------------------------------

    @staticmethod
    def _op(op: int, data: Any) -> dict[str, Any]:
        return {"op": op, "d": data, "s": None, "t": None}

    def _dispatch(self, session: GatewaySession, event: str, data: Any) -> asyncio.Future[float]:
        session.seq += 1
        frame = {"op": Op.DISPATCH, "d": data, "s": session.seq, "t": event}
        if session.connection is not None:
            return session.connection.enqueue(frame)
        missed: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        _fail(missed, ConnectionError("the bot is not connected"))
        return missed

    def dispatch(self, event: str, data: Any) -> asyncio.Future[float]:
        """Send an event to the bot's session; the future gives the time it hit the wire."""
        if self.session is None:
            raise ConnectionError("the bot has not identified with the fake gateway")
        return self._dispatch(self.session, event, data)

    def dispatch_if_connected(self, event: str, data: Any, *, intent: int = 0) -> None:
        """For world changes (a channel's permissions) that happen while a bot may be on."""
        if self.session is not None and (not intent or self.session.intents & intent):
            self._dispatch(self.session, event, data)

    # ---- message events for what the bot itself posts or a user sends ----------------------

    def _message_intents(self, message: FakeMessage) -> int:
        return Intent.GUILD_MESSAGES if message.guild_id is not None else Intent.DIRECT_MESSAGES

    def _message_event(self, message: FakeMessage) -> dict[str, Any] | None:
        if self.session is None or message.ephemeral:
            return None
        if not self.session.intents & self._message_intents(message):
            return None
        data = payloads.message(self.state, message, gateway=True)
        bot_id = self.state.bot_user.id
        sees_content = (
            self.session.intents & Intent.MESSAGE_CONTENT
            or message.author_id == bot_id
            or bot_id in message.mention_ids
            or message.guild_id is None
        )
        if not sees_content:  # what Discord does without the privileged intent
            data.update(content="", embeds=[], attachments=[], components=[])
        return data

    def message_created(self, message: FakeMessage) -> asyncio.Future[float] | None:
        data = self._message_event(message)
        return None if data is None else self.dispatch("MESSAGE_CREATE", data)

    def message_updated(self, message: FakeMessage) -> None:
        data = self._message_event(message)
        if data is not None:
            self.dispatch("MESSAGE_UPDATE", data)

    def message_deleted(self, message: FakeMessage) -> None:
        if self.session is None or message.ephemeral:
            return
        if not self.session.intents & self._message_intents(message):
            return
        data: dict[str, Any] = {"id": str(message.id), "channel_id": str(message.channel_id)}
        if message.guild_id is not None:
            data["guild_id"] = str(message.guild_id)
        self.dispatch("MESSAGE_DELETE", data)

    async def close_all(self) -> None:
        for conn in list(self._connections):
            with contextlib.suppress(Exception):
                await conn.close(1001, "fake Discord is shutting down")
