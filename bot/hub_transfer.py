"""Moving a Hub file into the cache so that an interruption, even of the process, loses
nothing: it arrives in `blobs/<etag>.partial`, which the next attempt continues with an HTTP
Range request, and becomes the blob the Hub client would have written (size checked, sha256
too for LFS files) once complete, linked from `snapshots/<commit>/<path>` as the Hub client
links it. Progress goes to the log, not to progress bars.

What the Hub answers (an ETag, a commit, a file's path) becomes a path in the cache only once
it has the form the Hub gives it: a blob is named by a git sha1 or a sha256, a snapshot by a
40-hex commit id, and a file's path stays inside its snapshot. Anything else is refused
(`HubAnswerRefused`) before anything is written."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, HfFileMetadata, get_hf_file_metadata, hf_hub_url
from huggingface_hub.file_download import http_get, repo_folder_name
from huggingface_hub.utils import WeakFileLock, build_hf_headers
from tqdm.auto import tqdm

PARTIAL = ".partial"  # a blob being downloaded: kept across restarts, unlike the Hub client's
_SHA256 = re.compile(r"[0-9a-f]{64}")  # the etag of an LFS file is the sha256 of its bytes
# A blob's name: the git sha1 of a plain file or the sha256 of an LFS file, as the Hub gives it.
_BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
COMMIT = re.compile(r"[0-9a-f]{40}")  # a full git commit id: what a snapshot folder is named


class HubAnswerRefused(OSError):
    """The Hub (or whatever HF_ENDPOINT names) answered metadata of a form the Hub never gives,
    which would have become a path outside the cache; nothing was written."""


def _shown(value: object) -> str:
    """A value from the Hub echoed in an error, bounded."""
    text = str(value)
    return repr(text[:80] + ("…" if len(text) > 80 else ""))


def checked_commit(commit: str | None, what: str) -> str:
    """`commit` if it is a full commit id, else HubAnswerRefused naming `what` it was for."""
    if commit is None or not COMMIT.fullmatch(commit):
        raise HubAnswerRefused(
            f"the commit the Hub gave for {what} is {_shown(commit)}, not a 40-hex commit id; "
            "nothing was written"
        )
    return commit


def _checked_blob_name(etag: str | None, path: str) -> str:
    if etag is None:
        raise OSError(f"the Hub gave no ETag for {path}")
    if not _BLOB_NAME.fullmatch(etag):
        raise HubAnswerRefused(
            f"the Hub's ETag for {path} is {_shown(etag)}, not a git sha1 or a sha256 (40 or "
            "64 hex digits); nothing was written"
        )
    return etag


def _snapshot_file(folder: Path, commit: str, path: str) -> Path:
    """Where `path` of the repo in `folder` sits in the snapshot of `commit`, refused unless
    it is a plain relative path that stays inside that snapshot."""
    parts = path.split("/")
    if "\\" in path or "\0" in path or any(part in ("", ".", "..") for part in parts):
        raise HubAnswerRefused(
            f"the Hub listed a file {_shown(path)}, which is not a path inside the repo; "
            "nothing was written"
        )
    return folder / "snapshots" / checked_commit(commit, path) / Path(*parts)


def repo_folder(model_id: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / repo_folder_name(repo_id=model_id, repo_type="model")


def size_text(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


class Quiet(tqdm):
    """The Hub client's progress bars, silenced: progress goes to the log instead."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "disable": True})


class Progress:
    """Bytes on disk in the repo's blob folder, as a line with the rate and the time left."""

    def __init__(self, model_id: str, remaining: int, blobs: Path) -> None:
        self._model_id, self._remaining, self._blobs = model_id, remaining, blobs
        self._started = time.monotonic()
        self._baseline = self._on_disk()

    def _on_disk(self) -> int:
        """Finished blobs and the partial files being written, in bytes."""
        if not self._blobs.is_dir():
            return 0
        return sum(p.stat().st_size for p in self._blobs.iterdir() if p.is_file())

    def done(self) -> int:
        return self._on_disk() - self._baseline

    def line(self) -> str:
        total = self._remaining
        done = min(self.done(), total)
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = done / elapsed
        left = f"about {(total - done) / rate:.0f} s left" if rate > 0 else "waiting for data"
        return (
            f"downloading {self._model_id}: {size_text(done)} of {size_text(total)} "
            f"({100 * done / max(total, 1):.0f}%), {size_text(rate)}/s, {left}"
        )

    def summary(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        return (
            f"downloaded {self._model_id}: {size_text(self._remaining)} "
            f"in {elapsed:.1f} s ({size_text(self.done() / elapsed)}/s)"
        )


def resolve_commit(model_id: str, revision: str | None) -> str:
    """The commit to fetch: `revision` when models.toml pins one, else the commit `main` is
    at now, as the Hub says (checked, since it names the snapshot folder)."""
    if revision is not None:
        return checked_commit(revision, model_id)
    return checked_commit(HfApi().model_info(model_id, revision="main").sha, model_id)


def record_main(model_id: str, cache_dir: Path, commit: str) -> None:
    """Note `commit` as where `main` is, as the Hub client's `refs/main` does."""
    refs = repo_folder(model_id, cache_dir) / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    written = refs / "main.writing"
    written.write_text(checked_commit(commit, model_id))
    written.replace(refs / "main")


def fetch_file(model_id: str, path: str, cache_dir: Path, commit: str) -> Path:
    """`path` of `model_id` at `commit` in the cache as the Hub client lays it out: its bytes
    in `blobs/<etag>` (fetched resumably unless there), linked from the snapshot."""
    pointer = _snapshot_file(repo_folder(model_id, cache_dir), commit, path)
    if pointer.is_file():
        return pointer
    blob = fetch_blob(model_id, path, cache_dir, commit)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.unlink(missing_ok=True)  # a link to a blob that is gone
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:  # no symbolic links here (Windows without developer mode): a copy
        shutil.copyfile(blob, pointer)
    return pointer


def fetch_blob(model_id: str, path: str, cache_dir: Path, commit: str) -> Path:
    """Download `path` at `commit` into `blobs/<etag>` by way of `<etag>.partial`, asking only
    for the bytes after those a stopped download left there. Under the Hub client's lock for
    that blob, so two processes never append to one partial file. The ETag names the blob
    only if it is a git sha1 or a sha256: HubAnswerRefused otherwise, before any write."""
    meta = get_hf_file_metadata(hf_hub_url(model_id, path, revision=commit))
    etag = _checked_blob_name(meta.etag, path)
    folder = repo_folder(model_id, cache_dir)
    lock = Path(cache_dir) / ".locks" / folder.name / f"{etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    blob = folder / "blobs" / etag
    with WeakFileLock(lock):
        _resume_blob(meta, blob, path)
    return blob


def _resume_blob(meta: HfFileMetadata, blob: Path, path: str) -> None:
    if blob.is_file():
        return
    partial = blob.with_name(blob.name + PARTIAL)
    have = partial.stat().st_size if partial.is_file() else 0
    if meta.size is not None and have > meta.size:
        have = 0
        partial.unlink()
    with partial.open("ab") as file:  # appends; http_get truncates it if the Range is ignored
        http_get(
            meta.location, file, resume_size=have, headers=build_hf_headers(),
            expected_size=meta.size, displayed_filename=path, tqdm_class=Quiet,
        )  # fmt: skip
    if meta.etag is not None and _SHA256.fullmatch(meta.etag):
        with partial.open("rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
        if digest != meta.etag:
            partial.unlink()
            raise OSError(f"{path} arrived damaged (its sha256 does not match); start again")
    partial.replace(blob)


def run_reporting(
    work: Callable[[], Path], every: float, progress: Progress, log: logging.Logger
) -> Path:
    """Run `work` in a daemon thread, logging progress until it ends. A daemon, so Ctrl-C or
    SIGTERM ends the process at once; what arrived so far stays for the next start."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["folder"] = work()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="model-download", daemon=True)
    thread.start()
    while True:
        thread.join(every)
        if not thread.is_alive():
            break
        log.info("%s", progress.line())
    if "error" in outcome:
        raise outcome["error"]
    return outcome["folder"]
