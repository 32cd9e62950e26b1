"""Which files a Hub model needs, whether they are already in the cache, and fetching the
missing ones: after a disk-space check, with progress in the log, resumable after an
interruption, even of the process: each file arrives in `blobs/<etag>.partial` in the Hub
cache, which the next start continues with an HTTP Range request, and becomes the blob the
Hub client would have written (size checked, sha256 too for LFS files) once complete.

One rule (`needed_files`) decides what "the model" is, for the download on start, for
`python -m bot download`, for loading (`bot/pipelines/loading.py` loads the cached snapshot)
and for `python -m bot doctor`. Torch-free, so a refusal costs no model import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import huggingface_hub.constants
from huggingface_hub import (
    HfApi,
    HfFileMetadata,
    RepoFile,
    get_cached_repo_tree,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import CachedRepoTreeNotFoundError
from huggingface_hub.file_download import http_get, repo_folder_name
from huggingface_hub.utils import WeakFileLock, build_hf_headers
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

TINY_MODEL = "tiny"  # built from code by bot/pipelines/tiny.py, never downloaded
MODEL_INDEX = "model_index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
_SHA256 = re.compile(r"[0-9a-f]{64}")  # the etag of an LFS file is the sha256 of its bytes
PARTIAL = ".partial"  # a blob being downloaded: kept across restarts, unlike the Hub client's


class ModelNotAvailable(RuntimeError):
    """The weights are not on this machine and cannot be fetched now; the message says how."""


class NotEnoughDisk(ModelNotAvailable):
    """The download would not fit in the free space of the model cache's disk."""


def looks_like_path(model_id: str) -> bool:
    """Hub ids are `owner/name`; anything else with a separator or dot prefix is a folder."""
    return (
        Path(model_id).expanduser().exists()
        or model_id.startswith((".", "~", "/", "\\"))
        or model_id.count("/") > 1
        or "\\" in model_id
    )


def is_hub_model(model_id: str) -> bool:
    return model_id != TINY_MODEL and not looks_like_path(model_id)


def _weight(name: str) -> tuple[str, str] | None:
    """(format, base name without shard suffix) of a weight file or its shard index, else None."""
    if name.endswith(".index.json"):
        name = name.removesuffix(".index.json")
    suffix = next((s for s in WEIGHT_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        return None
    return suffix, _SHARD.sub("", name.removesuffix(suffix))


def needed_files(paths: Iterable[str], model_index: Mapping[str, Any]) -> list[str]:
    """What diffusers loads from a pipeline repo without a variant: `model_index.json`, and in
    each component's folder its configs, tokenizer files and one set of full-precision weights,
    safetensors when there are any (else `.bin`). Other variants (`.fp16.`), other formats and
    files outside the components (the single-file checkpoints at the root) are left out."""
    folders = {
        name
        for name, value in model_index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0]
    }
    by_folder: dict[str, list[str]] = {}
    for path in paths:
        parts = PurePosixPath(path).parts
        if len(parts) == 2 and parts[0] in folders:
            by_folder.setdefault(parts[0], []).append(path)
    chosen = [MODEL_INDEX]
    for files in by_folder.values():
        plain = {}  # path -> format, for weights without a variant ("name", not "name.fp16")
        for path in files:
            weight = _weight(PurePosixPath(path).name)
            if weight is not None and "." not in weight[1]:
                plain[path] = weight[0]
        formats = set(plain.values())
        keep = ".safetensors" if ".safetensors" in formats else ".bin"
        for path in files:
            if _weight(PurePosixPath(path).name) is None or plain.get(path) == keep:
                chosen.append(path)
    return sorted(chosen)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0].rstrip(". ") if str(exc).strip() else type(exc).__name__


def _repo_folder(model_id: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / repo_folder_name(repo_id=model_id, repo_type="model")


def cached_model(model_id: str, cache_dir: Path) -> Path | None:
    """The cached snapshot folder of `model_id` if it holds every needed file, else None.
    Reads only the disk: the Hub client keeps the repo's file listing beside the snapshot."""
    try:
        listing = get_cached_repo_tree(model_id, cache_dir=cache_dir)
        commit = (_repo_folder(model_id, cache_dir) / "refs" / "main").read_text().strip()
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None
    folder = _repo_folder(model_id, cache_dir) / "snapshots" / commit
    try:
        index = json.loads((folder / MODEL_INDEX).read_text())
    except (OSError, ValueError):
        return None
    needed = needed_files((f.path for f in listing), index)
    return folder if all((folder / path).is_file() for path in needed) else None


def disk_free(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or would, once created)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def size_text(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class DownloadPlan:
    """The needed files of a repo, and those of them that are not on disk yet."""

    model_id: str
    files: dict[str, int]  # needed path -> size in bytes
    missing: dict[str, int]
    resumed: int = 0  # bytes already in partial files an earlier download left

    @property
    def remaining(self) -> int:
        return max(sum(self.missing.values()) - self.resumed, 0)


def plan_download(model_id: str, cache_dir: Path) -> DownloadPlan:
    """Ask the Hub for the repo's file listing (sizes included) and its `model_index.json`."""
    api = HfApi()
    try:
        index_path = hf_hub_download(model_id, MODEL_INDEX, cache_dir=cache_dir)
        sizes = {
            f.path: f.size
            for f in api.list_repo_tree(model_id, recursive=True)
            if isinstance(f, RepoFile)
        }
        index = json.loads(Path(index_path).read_text())
    except Exception as exc:  # the Hub client's errors: HTTP, connection, offline, not found
        raise ModelNotAvailable(
            f"Model {model_id!r} could not be downloaded: {_first_line(exc)}. Check the id and the "
            "network, or fetch it elsewhere with `python -m bot download` and copy MODEL_CACHE."
        ) from exc
    files = {path: sizes[path] for path in needed_files(sizes, index)}
    snapshot = Path(index_path).parent
    missing = {path: size for path, size in files.items() if not (snapshot / path).is_file()}
    resumed = sum(p.stat().st_size for p in _partials(model_id, cache_dir))
    return DownloadPlan(model_id, files, missing, resumed)


def _partials(model_id: str, cache_dir: Path) -> list[Path]:
    return list((_repo_folder(model_id, cache_dir) / "blobs").glob(f"*{PARTIAL}"))


class _Quiet(tqdm):
    """The Hub client's progress bars, silenced: progress goes to the log instead."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "disable": True})


class _Progress:
    """Bytes on disk in the repo's blob folder, as a line with the rate and the time left."""

    def __init__(self, plan: DownloadPlan, blobs: Path) -> None:
        self._plan, self._blobs = plan, blobs
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
        total = self._plan.remaining
        done = min(self.done(), total)
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = done / elapsed
        left = f"about {(total - done) / rate:.0f} s left" if rate > 0 else "waiting for data"
        return (
            f"downloading {self._plan.model_id}: {size_text(done)} of {size_text(total)} "
            f"({100 * done / max(total, 1):.0f}%), {size_text(rate)}/s, {left}"
        )

    def summary(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        return (
            f"downloaded {self._plan.model_id}: {size_text(self._plan.remaining)} "
            f"in {elapsed:.1f} s ({size_text(self.done() / elapsed)}/s)"
        )


def fetch_model(
    model_id: str,
    cache_dir: Path,
    *,
    free_bytes: Callable[[Path], int] = disk_free,
    every: float = 5.0,
) -> Path:
    """Download what `model_id` needs into `cache_dir` and return its snapshot folder. Refuses
    with `NotEnoughDisk` before fetching anything if the rest will not fit (`free_bytes` says
    what is free); logs progress every `every` seconds. Interrupted, even by the end of the
    process, the next call fetches only what is missing, from where each file stopped."""
    plan = plan_download(model_id, cache_dir)
    if not plan.missing:
        return _snapshot(model_id, cache_dir, plan)
    free = free_bytes(Path(cache_dir))
    if plan.remaining > free:
        raise NotEnoughDisk(
            f"Not enough disk space to download {model_id}: it needs "
            f"{size_text(plan.remaining)} in {cache_dir} and {size_text(free)} is free. "
            "Free some space or point MODEL_CACHE at a larger disk."
        )
    present = len(plan.files) - len(plan.missing) - 1  # model_index.json came with the plan
    log.info(
        "downloading %s into %s: %d files, %s%s%s",
        model_id, cache_dir, len(plan.missing), size_text(plan.remaining),
        f" ({present} already here from an earlier download)" if present else "",
        f" (resuming after {size_text(plan.resumed)})" if plan.resumed else "",
    )  # fmt: skip
    progress = _Progress(plan, _repo_folder(model_id, cache_dir) / "blobs")
    try:
        folder = _in_daemon_thread(lambda: _download(model_id, cache_dir, plan), every, progress)
    except Exception as exc:
        raise ModelNotAvailable(
            f"Downloading {model_id} stopped: {_first_line(exc)}. Start again to resume "
            "where it stopped."
        ) from exc
    log.info("%s", progress.summary())
    return folder


def _download(model_id: str, cache_dir: Path, plan: DownloadPlan) -> Path:
    """Each missing file into its blob, resumably, then into the snapshot: the Hub client finds
    the blob and links it as it links its own. Partial files left by another revision go."""
    for path in plan.missing:
        _fetch_blob(model_id, path, Path(cache_dir))
        hf_hub_download(model_id, path, cache_dir=cache_dir, tqdm_class=_Quiet)
    folder = _snapshot(model_id, cache_dir, plan)
    for partial in _partials(model_id, cache_dir):
        partial.unlink(missing_ok=True)
    return folder


def _fetch_blob(model_id: str, path: str, cache_dir: Path) -> None:
    """Download `path` into `blobs/<etag>` by way of `<etag>.partial`, asking only for the bytes
    after those a stopped download left there. Under the Hub client's lock for that blob, so
    two processes never append to one partial file."""
    meta = get_hf_file_metadata(hf_hub_url(model_id, path))
    if meta.etag is None:
        raise OSError(f"the Hub gave no ETag for {path}")
    folder = _repo_folder(model_id, cache_dir)
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
            expected_size=meta.size, displayed_filename=path, tqdm_class=_Quiet,
        )  # fmt: skip
    if meta.etag is not None and _SHA256.fullmatch(meta.etag):
        with partial.open("rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
        if digest != meta.etag:
            partial.unlink()
            raise OSError(f"{path} arrived damaged (its sha256 does not match); start again")
    partial.replace(blob)


def _snapshot(model_id: str, cache_dir: Path, plan: DownloadPlan) -> Path:
    return Path(
        snapshot_download(
            model_id, cache_dir=cache_dir, allow_patterns=list(plan.files), tqdm_class=_Quiet
        )
    )


def _in_daemon_thread(work: Callable[[], Path], every: float, progress: _Progress) -> Path:
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


def fetch_if_missing(model_id: str, cache_dir: Path, *, allowed: bool) -> None:
    """On start: download a Hub model that is not cached, unless AUTO_DOWNLOAD=false or
    HF_HUB_OFFLINE=1 forbid it (loading then fails with the line that says how to fetch it)."""
    if not is_hub_model(model_id) or cached_model(model_id, cache_dir) is not None:
        return
    if allowed and not huggingface_hub.constants.HF_HUB_OFFLINE:
        fetch_model(model_id, cache_dir)
