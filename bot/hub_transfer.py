"""Moving a Hub file into the cache so that an interruption, even of the process, loses
nothing: it arrives in `blobs/<etag>.partial`, which the next attempt continues with an HTTP
Range request, and becomes the blob the Hub client would have written (size checked, sha256
too for LFS files) once complete. Progress goes to the log, not to progress bars."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import HfFileMetadata, get_hf_file_metadata, hf_hub_url
from huggingface_hub.file_download import http_get, repo_folder_name
from huggingface_hub.utils import WeakFileLock, build_hf_headers
from tqdm.auto import tqdm

PARTIAL = ".partial"  # a blob being downloaded: kept across restarts, unlike the Hub client's
_SHA256 = re.compile(r"[0-9a-f]{64}")  # the etag of an LFS file is the sha256 of its bytes


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


def fetch_blob(model_id: str, path: str, cache_dir: Path) -> None:
    """Download `path` into `blobs/<etag>` by way of `<etag>.partial`, asking only for the bytes
    after those a stopped download left there. Under the Hub client's lock for that blob, so
    two processes never append to one partial file."""
    meta = get_hf_file_metadata(hf_hub_url(model_id, path))
    if meta.etag is None:
        raise OSError(f"the Hub gave no ETag for {path}")
    folder = repo_folder(model_id, cache_dir)
    lock = cache_dir / ".locks" / folder.name / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        _resume_blob(meta, folder / "blobs" / meta.etag, path)


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
