"""A stand-in for the Hugging Face Hub on 127.0.0.1: the few routes huggingface_hub uses to
download a model repo (repo info, the recursive file listing, HEAD and ranged GET of a file),
serving files from memory. Point the Hub client at it with HF_ENDPOINT (a child process) or
by setting `huggingface_hub.constants.ENDPOINT` (this process).

    async with FakeHub({"owner/model": files}) as hub:
        env["HF_ENDPOINT"] = hub.url

`chunk_delay` slows every file down (so progress can be watched); `cut_once(path, n)` drops
the connection after n bytes of that file, once (the client resumes with a Range request),
and with `then=status` fails that file from then on (a run that stops mid-file, as if the
process had been killed there); `failing[path] = status` answers that file's GET with an error
(a run that stops there); `requests` records what the client asked for.

`revisions` serves other commits of a repo besides `main` (which is at COMMIT): a repo pinned to
one of them gets its files, any other revision gets the Hub's "revision not found". A hostile
Hub: `etags[path]` answers that file with any ETag header, `main_commit` says `main` is at any
commit."""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import pytest
from aiohttp import web

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 64 * 1024


@dataclass
class HubRequest:
    method: str
    path: str
    range: str | None


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by its path relative to it ('/'-separated)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class FakeHub:
    def __init__(
        self,
        repos: dict[str, dict[str, bytes]],
        *,
        chunk_delay: float = 0.0,
        revisions: dict[str, dict[str, dict[str, bytes]]] | None = None,
    ) -> None:
        self.repos = repos
        self.revisions = revisions or {}  # repo id -> commit -> files, besides main
        self.main_commit = COMMIT
        self.etags: dict[str, str] = {}
        self.chunk_delay = chunk_delay
        self.requests: list[HubRequest] = []
        self.failing: dict[str, int] = {}
        self._cuts: dict[str, tuple[int, int | None]] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    def cut_once(self, path: str, count: int, *, then: int | None = None) -> None:
        self._cuts[path] = (count, then)

    def downloads(self) -> list[str]:
        """Files whose bytes were asked for (GET of a file, at any revision), in order."""
        return [re.sub(r"^.*?/resolve/[^/]+/", "", r.path)
                for r in self.requests if r.method == "GET" and "/resolve/" in r.path]  # fmt: skip

    async def __aenter__(self) -> FakeHub:
        app = web.Application()
        app.router.add_get("/api/models/{owner}/{name}", self._info)
        app.router.add_get("/api/models/{owner}/{name}/revision/{revision}", self._info)
        app.router.add_get("/api/models/{owner}/{name}/tree/{revision}", self._tree)
        app.router.add_route("*", "/{owner}/{name}/resolve/{revision}/{path:.+}", self._file)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _repo(self, request: web.Request) -> tuple[str, str, dict[str, bytes]]:
        """The repo id, the commit and the files a request asks for."""
        self.requests.append(HubRequest(request.method, request.path, request.headers.get("Range")))
        repo_id = f"{request.match_info['owner']}/{request.match_info['name']}"
        if repo_id not in self.repos:
            raise web.HTTPNotFound(
                text='{"error": "Repository not found"}',
                content_type="application/json",
                headers={"X-Error-Code": "RepoNotFound"},
            )
        revision = request.match_info.get("revision", "main")
        if revision in ("main", COMMIT, self.main_commit):
            return repo_id, self.main_commit, self.repos[repo_id]
        if revision not in self.revisions.get(repo_id, {}):
            raise web.HTTPNotFound(
                text='{"error": "Invalid rev id"}',
                content_type="application/json",
                headers={"X-Error-Code": "RevisionNotFound"},
            )
        return repo_id, revision, self.revisions[repo_id][revision]

    async def _info(self, request: web.Request) -> web.Response:
        repo_id, commit, files = self._repo(request)
        return web.json_response(
            {
                "_id": "0" * 24,
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": False,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": ["diffusers"],
                "library_name": "diffusers",
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": path} for path in files],
            }
        )

    async def _tree(self, request: web.Request) -> web.Response:
        _, _, files = self._repo(request)
        folders = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
        entries = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in folders]
        entries += [
            {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": p}
            for p, data in files.items()
        ]
        return web.json_response(entries)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        _, commit, files = self._repo(request)
        path = request.match_info["path"]
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        if path not in files:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        if path in self.failing and request.method == "GET":
            return web.Response(status=self.failing[path], text="failing on purpose")
        data = files[path]
        headers = {
            "X-Repo-Commit": commit,
            "ETag": self.etags.get(path, f'"{hashlib.sha256(data).hexdigest()}"'),
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return web.Response(status=200, headers=headers)
        start = 0
        if request.http_range.start is not None:
            start = request.http_range.start
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        response = web.StreamResponse(status=206 if start else 200, headers=headers)
        response.content_length = len(data) - start
        await response.prepare(request)
        cut, then = self._cuts.pop(path, (None, None))
        for offset in range(start, len(data), CHUNK):
            if cut is not None and offset - start >= cut:
                if then is not None:
                    self.failing[path] = then
                assert request.transport is not None
                request.transport.close()  # the connection drops mid-file
                return response
            await response.write(data[offset : offset + CHUNK])
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        await response.write_eof()
        return response


def point_client_at(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's Hub client asks `hub`, online, for the rest of the test."""
    constants = huggingface_hub.constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    # Written to disk in 64 KB pieces instead of 10 MB, so a 4 MB file shows progress.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
