"""Interaction callbacks and the interaction webhook (follow-ups, original response).

Discord's rules that bots trip over are enforced: acknowledge within 3 s, only once; no
follow-up before the acknowledgement; the first follow-up after a "thinking" defer fills in
the deferred message and keeps the defer's ephemerality."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from . import payloads
from .bodies import UploadedFile
from .interactions import InteractionHandle
from .models import FakeMessage, InteractionCallback, MessageFlag
from .rest import body_of, json_response, no_content, truthy, unknown
from .state import FakeState
from .validation import Refusal, check_choices, check_message, field_error, invalid_form

APPLICATION_COMMAND, MESSAGE_COMPONENT, AUTOCOMPLETE = 2, 3, 4
MESSAGE, DEFERRED_MESSAGE, DEFERRED_UPDATE, UPDATE_MESSAGE, AUTOCOMPLETE_RESULT = 4, 5, 6, 7, 8

# The callbacks this fake implements (modals are refused as invalid). An autocomplete
# interaction takes only choices: it cannot be deferred or answered with a message.
ALLOWED_CALLBACKS = {
    APPLICATION_COMMAND: {MESSAGE, DEFERRED_MESSAGE},
    MESSAGE_COMPONENT: {MESSAGE, DEFERRED_MESSAGE, DEFERRED_UPDATE, UPDATE_MESSAGE},
    AUTOCOMPLETE: {AUTOCOMPLETE_RESULT},
}


def _unknown_interaction() -> Refusal:
    return Refusal(404, payloads.error(10062, "Unknown interaction"), bot_error=True)


def _unknown_webhook() -> Refusal:
    return Refusal(404, payloads.error(10015, "Unknown Webhook"), bot_error=True)


class InteractionApi:
    def __init__(self, state: FakeState) -> None:
        self.state = state

    def routes(self) -> list[web.RouteDef]:
        message = "/webhooks/{app_id}/{token}/messages/{message_id}"
        return [
            web.post("/interactions/{interaction_id}/{token}/callback", self.callback),
            web.post("/webhooks/{app_id}/{token}", self.followup),
            web.patch(message, self.edit_message),
            web.delete(message, self.delete_message),
        ]

    # ---- POST /interactions/{id}/{token}/callback -------------------------------------------

    async def callback(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        handle = self.state.interactions.get(int(request.match_info["interaction_id"]))
        if handle is None or handle.token != request.match_info["token"]:
            raise _unknown_interaction()
        if handle.responses:
            raise Refusal(
                400,
                payloads.error(40060, "Interaction has already been acknowledged."),
                bot_error=True,
            )
        if arrived - handle.dispatched_at > self.state.ack_timeout:
            raise _unknown_interaction()
        body = body_of(request)
        response_type = body.object.get("type")
        data: dict[str, Any] = body.object.get("data") or {}
        if response_type not in ALLOWED_CALLBACKS.get(handle.type, set()):
            error = field_error(
                "INTERACTION_RESPONSE_TYPE_INVALID", "Invalid interaction response type"
            )
            raise invalid_form({"type": error})

        callback = InteractionCallback(type=response_type, data=data, at=arrived)
        if response_type == AUTOCOMPLETE_RESULT:
            check_choices(data, handle.focused_type)
            handle.responses.append(callback)
            self.state.changed.notify()
            return no_content()  # no message, so nothing to return even when asked
        message = self._apply_callback(handle, callback, body.files)
        handle.responses.append(callback)
        self.state.changed.notify()
        if not truthy(request.query.get("with_response")):
            return no_content()
        return json_response(self._callback_response(handle, callback, message))

    def _apply_callback(
        self, handle: InteractionHandle, callback: InteractionCallback, files: list[UploadedFile]
    ) -> FakeMessage:
        state, data = self.state, callback.data
        if callback.type == MESSAGE:
            check_message(data, files, creating=True)
            message = state.create_bot_message(
                handle.channel_id,
                data,
                files,
                interaction_id=handle.id,
                message_type=_message_type(handle),
            )
            handle.original_message_id = message.id
        elif callback.type == DEFERRED_MESSAGE:
            ephemeral = int(data.get("flags") or 0) & MessageFlag.EPHEMERAL
            message = state.create_bot_message(
                handle.channel_id,
                {"flags": ephemeral},
                [],
                interaction_id=handle.id,
                message_type=_message_type(handle),
                extra_flags=MessageFlag.LOADING,
            )
            handle.original_message_id = message.id
        else:  # DEFERRED_UPDATE or UPDATE_MESSAGE: a component's own message
            message = state.messages_by_id[handle.message_id or 0]
            if callback.type == UPDATE_MESSAGE:
                state.edit_checked(message, data, files)
            handle.original_message_id = message.id
        callback.message_id = message.id
        return message

    def _callback_response(
        self, handle: InteractionHandle, callback: InteractionCallback, message: FakeMessage
    ) -> dict[str, Any]:
        """The `?with_response=true` body: the interaction and the resource it created."""
        interaction: dict[str, Any] = {
            "id": str(handle.id),
            "type": handle.type,
            "response_message_id": str(message.id),
            "response_message_loading": message.loading,
            "response_message_ephemeral": message.ephemeral,
        }
        resource: dict[str, Any] = {"type": callback.type}
        if callback.type != DEFERRED_UPDATE:
            resource["message"] = payloads.message(self.state, message)
        return {"interaction": interaction, "resource": resource}

    # ---- /webhooks/{app_id}/{token} ---------------------------------------------------------

    def _handle(self, request: web.Request) -> InteractionHandle:
        if int(request.match_info["app_id"]) != self.state.application_id:
            raise _unknown_webhook()
        token = request.match_info["token"]
        for handle in self.state.interactions.values():
            if handle.token == token:
                if not handle.responses:  # the token works once the interaction is acked
                    raise _unknown_webhook()
                return handle
        raise _unknown_webhook()

    async def followup(self, request: web.Request) -> web.Response:
        handle = self._handle(request)
        body = body_of(request)
        data = body.object
        check_message(data, body.files, creating=True)
        original = (
            self.state.messages_by_id.get(handle.original_message_id)
            if handle.original_message_id is not None
            else None
        )
        first = handle.responses[0]
        if first.type == DEFERRED_MESSAGE and original is not None and original.loading:
            message = self.state.edit_message(original, data, body.files)
        else:
            message = self.state.create_bot_message(
                handle.channel_id, data, body.files, interaction_id=handle.id
            )
        handle.followup_ids.append(message.id)
        self.state.changed.notify()
        if not truthy(request.query.get("wait")):
            return no_content()
        return json_response(payloads.message(self.state, message))

    def _webhook_message(self, request: web.Request) -> tuple[InteractionHandle, FakeMessage]:
        handle = self._handle(request)
        raw = request.match_info["message_id"]
        if raw == "@original":
            message_id = handle.original_message_id
        else:
            message_id = int(raw)
            if message_id not in (handle.original_message_id, *handle.followup_ids):
                message_id = None
        message = self.state.messages_by_id.get(message_id) if message_id is not None else None
        if message is None or message.deleted:
            raise unknown(10008, "Message")
        return handle, message

    async def edit_message(self, request: web.Request) -> web.Response:
        _, message = self._webhook_message(request)
        body = body_of(request)
        self.state.edit_checked(message, body.object, body.files)
        return json_response(payloads.message(self.state, message))

    async def delete_message(self, request: web.Request) -> web.Response:
        _, message = self._webhook_message(request)
        self.state.delete_message(message)
        return no_content()


def _message_type(handle: InteractionHandle) -> int:
    """20 CHAT_INPUT_COMMAND / 23 CONTEXT_MENU_COMMAND for command replies, else DEFAULT."""
    if handle.type != APPLICATION_COMMAND:
        return 0
    return 20 if handle.command_type == 1 else 23
