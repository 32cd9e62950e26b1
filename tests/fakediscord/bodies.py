"""Read request bodies the way Discord does: JSON, or multipart with `payload_json` plus
`files[n]` parts (discord.py's format for uploads)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web


@dataclass
class UploadedFile:
    """One `files[n]` part; `index` is the n that attachment entries refer to by `id`."""

    index: int
    filename: str
    data: bytes
    content_type: str | None


@dataclass
class RequestBody:
    json: Any = None
    files: list[UploadedFile] = field(default_factory=list)

    def summary(self) -> Any:
        """What `FakeDiscord.requests` records: the JSON, plus file names and sizes if any."""
        if not self.files:
            return self.json
        return {
            "payload_json": self.json,
            "files": [
                {"index": f.index, "filename": f.filename, "size": len(f.data)} for f in self.files
            ],
        }

    @property
    def object(self) -> dict[str, Any]:
        """The JSON body when it is an object, else an empty one."""
        return self.json if isinstance(self.json, dict) else {}


BODY = web.RequestKey("body", RequestBody)


class BadBody(Exception):
    """The body could not be parsed: Discord answers 400 / 50109 "invalid JSON"."""


async def read_body(request: web.Request) -> RequestBody:
    if request.content_type == "multipart/form-data":
        return await _read_multipart(request)
    raw = await request.read()
    if not raw:
        return RequestBody()
    try:
        return RequestBody(json=json.loads(raw))
    except ValueError as exc:
        raise BadBody(str(exc)) from exc


async def _read_multipart(request: web.Request) -> RequestBody:
    body = RequestBody()
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):  # nested multipart: discord.py sends none
            continue
        name = part.name or ""
        data = await part.read(decode=True)
        if name == "payload_json":
            try:
                body.json = json.loads(data)
            except ValueError as exc:
                raise BadBody(str(exc)) from exc
        elif name.startswith("files[") and name.endswith("]"):
            try:
                index = int(name[len("files[") : -1])
            except ValueError as exc:
                raise BadBody(f"bad file field {name!r}") from exc
            content_type = part.headers.get("Content-Type")
            body.files.append(
                UploadedFile(index, part.filename or f"file{index}", bytes(data), content_type)
            )
    return body
