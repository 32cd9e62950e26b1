"""Which files a Hub model or LoRA needs, whether they are already in the cache, and fetching
the missing ones: after a disk-space check, with progress in the log, resumable after an
interruption, even of the process (bot/hub_transfer.py).

One rule (`needed_files`) decides what "the model" is, for the download on start, for
`python -m bot download`, for loading (`bot/pipelines/loading.py` loads the cached snapshot)
and for `python -m bot doctor`. A `revision` (a commit id models.toml pins) names the snapshot
each of them uses; without one, the commit `main` was at when it was fetched. Torch-free, so a
refusal costs no model import.
"""

from __future__ import annotations

import glob
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import huggingface_hub.constants
from huggingface_hub import HfApi, RepoFile, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import CachedRepoTreeNotFoundError

from bot.hub_transfer import (
    COMMIT,
    PARTIAL,
    HubAnswerRefused,
    Progress,
    Quiet,
    fetch_file,
    record_main,
    repo_folder,
    resolve_commit,
    run_reporting,
    size_text,
)

log = logging.getLogger(__name__)

TINY_MODEL = "tiny"  # built from code by bot/pipelines/tiny.py, never downloaded
# Every source built from code by bot/pipelines/tiny.py: usable offline, never downloaded.
BUILTIN_SOURCES = {TINY_MODEL, "tiny-sdxl", "tiny-inpaint", "tiny-flux", "tiny-lora"}
SAFETENSORS = ".safetensors"  # the one weight format taken from models.toml: a pickle can run code
MODEL_INDEX = "model_index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


class ModelNotAvailable(RuntimeError):
    """The weights are not on this machine and cannot be fetched now; the message says how."""


class NotEnoughDisk(ModelNotAvailable):
    """The download would not fit in the free space of the model cache's disk."""


def looks_like_path(model_id: str) -> bool:
    """Hub ids are `owner/name`; anything else with a separator or dot prefix is a folder,
    and a name ending in .safetensors a file (a LoRA)."""
    return (
        Path(model_id).expanduser().exists()
        or model_id.startswith((".", "~", "/", "\\"))
        or model_id.count("/") > 1
        or "\\" in model_id
        or model_id.endswith(SAFETENSORS)
    )


def is_hub_model(model_id: str) -> bool:
    return model_id not in BUILTIN_SOURCES and not looks_like_path(model_id)


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


def _refused(repo_id: str, exc: HubAnswerRefused) -> ModelNotAvailable:
    return ModelNotAvailable(
        f"Downloading {repo_id} was refused: {_first_line(exc)}. The Hub never answers this: "
        "is HF_ENDPOINT a Hub you trust?"
    )


def _at(revision: str | None) -> str:
    """For messages: " at <commit>" when a revision is pinned."""
    return "" if revision is None else f" at {revision}"


def lora_files(paths: Iterable[str]) -> list[str]:
    """What a LoRA repo is to the bot: its .safetensors files, nothing else."""
    return sorted(path for path in paths if path.endswith(SAFETENSORS))


def _cached_listing(
    repo_id: str, cache_dir: Path, revision: str | None
) -> tuple[Path, list[str]] | None:
    """The cached snapshot folder of `repo_id` at `revision` (None: where `main` was when it
    was fetched) and the repo's file listing, from disk only: the Hub client keeps the listing
    beside the snapshot."""
    folder = repo_folder(repo_id, cache_dir)
    try:
        listing = get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir)
        commit = revision or (folder / "refs" / "main").read_text().strip()
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None
    if not COMMIT.fullmatch(commit):
        return None
    return folder / "snapshots" / commit, [f.path for f in listing]


def cached_model(model_id: str, cache_dir: Path, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of `model_id` (at `revision`, if pinned) if it holds every
    needed file, else None."""
    found = _cached_listing(model_id, cache_dir, revision)
    if found is None:
        return None
    folder, paths = found
    try:
        index = json.loads((folder / MODEL_INDEX).read_text())
    except (OSError, ValueError):
        return None
    needed = needed_files(paths, index)
    return folder if all((folder / path).is_file() for path in needed) else None


def cached_lora(source: str, cache_dir: Path, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of a LoRA repo (at `revision`, if pinned) if it holds its
    .safetensors files, else None."""
    found = _cached_listing(source, cache_dir, revision)
    if found is None:
        return None
    folder, paths = found
    needed = lora_files(paths)
    return folder if needed and all((folder / path).is_file() for path in needed) else None


def source_available(kind: str, source: str, cache_dir: Path, revision: str | None = None) -> bool:
    """Whether a model (`kind` "model") or a LoRA ("lora") can load without a download:
    built in, an existing local path, or complete in the Hub cache (at `revision`, if pinned)."""
    if source in BUILTIN_SOURCES:
        return True
    if looks_like_path(source):
        return Path(source).expanduser().exists()
    cached = cached_model if kind == "model" else cached_lora
    return cached(source, cache_dir, revision) is not None


def missing_sources(sources: Iterable[tuple[str, str, str | None]], cache_dir: Path) -> set[str]:
    """The sources of (kind, source, revision) that are not on this machine, each logged with
    the command that fetches it: start-up never downloads what models.toml names."""
    missing = set()
    for kind, source, revision in sources:
        if not source_available(kind, source, cache_dir, revision):
            log.warning(
                "%s %s%s is not in %s: members are refused it until `python -m bot download` "
                "fetches it",
                kind, source, _at(revision), cache_dir,
            )  # fmt: skip
            missing.add(source)
    return missing


def disk_free(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or would, once created)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


@dataclass(frozen=True)
class DownloadPlan:
    """The needed files of a repo, and those of them that are not on disk yet."""

    model_id: str
    commit: str  # the one commit every file comes from
    files: dict[str, int]  # needed path -> size in bytes
    missing: dict[str, int]
    resumed: int = 0  # bytes already in partial files an earlier download left

    @property
    def remaining(self) -> int:
        return max(sum(self.missing.values()) - self.resumed, 0)


def _repo_sizes(repo_id: str, commit: str) -> dict[str, int]:
    """Every file of the repo at `commit`, with its size, from the Hub's listing."""
    tree = HfApi().list_repo_tree(repo_id, recursive=True, revision=commit)
    return {f.path: f.size for f in tree if isinstance(f, RepoFile)}


def plan_download(model_id: str, cache_dir: Path, revision: str | None = None) -> DownloadPlan:
    """Ask the Hub for the repo's file listing (sizes included) and its `model_index.json`, at
    `revision` if pinned, else where `main` is now."""
    try:
        commit = resolve_commit(model_id, revision)
        sizes = _repo_sizes(model_id, commit)
        index_path = fetch_file(model_id, MODEL_INDEX, cache_dir, commit)
        index = json.loads(index_path.read_text())
    except HubAnswerRefused as exc:
        raise _refused(model_id, exc) from exc
    except Exception as exc:  # the Hub client's errors: HTTP, connection, offline, not found
        raise ModelNotAvailable(
            f"Model {model_id!r}{_at(revision)} could not be downloaded: {_first_line(exc)}. "
            "Check the id, the revision and the network, or fetch it elsewhere with "
            "`python -m bot download` and copy MODEL_CACHE."
        ) from exc
    files = {path: sizes[path] for path in needed_files(sizes, index) if path in sizes}
    snapshot = index_path.parent
    missing = {path: size for path, size in files.items() if not (snapshot / path).is_file()}
    resumed = sum(p.stat().st_size for p in _partials(model_id, cache_dir))
    return DownloadPlan(model_id, commit, files, missing, resumed)


def _partials(model_id: str, cache_dir: Path) -> list[Path]:
    return list((repo_folder(model_id, cache_dir) / "blobs").glob(f"*{PARTIAL}"))


def fetch_model(
    model_id: str,
    cache_dir: Path,
    *,
    free_bytes: Callable[[Path], int] = disk_free,
    every: float = 5.0,
    safetensors_only: bool = False,
    revision: str | None = None,
) -> Path:
    """Download what `model_id` needs (at `revision`, if pinned) into `cache_dir` and return
    its snapshot folder. Refuses with `NotEnoughDisk` before fetching anything if the rest will
    not fit (`free_bytes` says what is free); logs progress every `every` seconds. Interrupted,
    even by the end of the process, the next call fetches only what is missing, from where each
    file stopped. `safetensors_only` refuses a model whose weights come only pickled (they can
    run code)."""
    plan = plan_download(model_id, cache_dir, revision)
    pickled = [p for p in plan.files if (w := _weight(p)) is not None and w[0] != SAFETENSORS]
    if safetensors_only and pickled:
        raise ModelNotAvailable(
            f"{model_id} has weights only in a pickle format ({pickled[0]}); models.toml takes "
            "safetensors only. Choose a repo that has .safetensors weights."
        )
    if not plan.missing:
        return _snapshot(model_id, cache_dir, plan.commit, list(plan.files), revision)
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
    progress = Progress(model_id, plan.remaining, repo_folder(model_id, cache_dir) / "blobs")
    try:
        folder = run_reporting(
            lambda: _download(model_id, cache_dir, plan, revision), every, progress, log
        )
    except HubAnswerRefused as exc:
        raise _refused(model_id, exc) from exc
    except Exception as exc:
        raise ModelNotAvailable(
            f"Downloading {model_id} stopped: {_first_line(exc)}. Start again to resume "
            "where it stopped."
        ) from exc
    log.info("%s", progress.summary())
    return folder


def fetch_lora(
    source: str,
    cache_dir: Path,
    *,
    free_bytes: Callable[[Path], int] = disk_free,
    revision: str | None = None,
) -> Path:
    """Download a LoRA repo's .safetensors files (nothing else; at `revision`, if pinned) and
    return its snapshot folder; refused, before fetching anything, when it has none or they
    would not fit on the disk."""
    try:
        commit = resolve_commit(source, revision)
        sizes = _repo_sizes(source, commit)
    except HubAnswerRefused as exc:
        raise _refused(source, exc) from exc
    except Exception as exc:  # the Hub client's errors: HTTP, connection, offline, not found
        raise ModelNotAvailable(
            f"LoRA {source!r}{_at(revision)} could not be downloaded: {_first_line(exc)}. "
            "Check the id, the revision and the network."
        ) from exc
    files = lora_files(sizes)
    if not files:
        raise ModelNotAvailable(
            f"LoRA {source!r} holds no .safetensors file; LoRAs are taken as safetensors only."
        )
    total, free = sum(sizes[path] for path in files), free_bytes(Path(cache_dir))
    if total > free:
        raise NotEnoughDisk(
            f"Not enough disk space to download {source}: it needs {size_text(total)} in "
            f"{cache_dir} and {size_text(free)} is free."
        )
    log.info("downloading LoRA %s: %s", source, size_text(total))
    try:
        for path in files:
            fetch_file(source, path, Path(cache_dir), commit)
        return _snapshot(source, cache_dir, commit, files, revision)
    except HubAnswerRefused as exc:
        raise _refused(source, exc) from exc
    except Exception as exc:
        raise ModelNotAvailable(
            f"Downloading LoRA {source} stopped: {_first_line(exc)}. Start again to resume."
        ) from exc


def _download(model_id: str, cache_dir: Path, plan: DownloadPlan, revision: str | None) -> Path:
    """Each missing file into its blob, resumably, linked into the snapshot of the plan's
    commit. Partial files left by another revision go."""
    for path in plan.missing:
        fetch_file(model_id, path, Path(cache_dir), plan.commit)
    folder = _snapshot(model_id, cache_dir, plan.commit, list(plan.files), revision)
    for partial in _partials(model_id, cache_dir):
        partial.unlink(missing_ok=True)
    return folder


def _snapshot(
    repo_id: str, cache_dir: Path, commit: str, files: list[str], revision: str | None
) -> Path:
    """The snapshot folder of `commit`, every file of which is linked already: the Hub client
    only records the repo's listing beside it (what `cached_model` reads). Its patterns match
    each path literally, so no file the listing names besides these is fetched through it.
    Unpinned, `refs/main` then points at `commit`."""
    options = {"cache_dir": cache_dir, "allow_patterns": [glob.escape(p) for p in files]}
    folder = Path(snapshot_download(repo_id, revision=commit, tqdm_class=Quiet, **options))
    if revision is None:
        record_main(repo_id, Path(cache_dir), commit)
    return folder


def fetch_if_missing(model_id: str, cache_dir: Path, *, allowed: bool) -> None:
    """On start: download a Hub model that is not cached, unless AUTO_DOWNLOAD=false or
    HF_HUB_OFFLINE=1 forbid it (loading then fails with the line that says how to fetch it)."""
    if not is_hub_model(model_id) or cached_model(model_id, cache_dir) is not None:
        return
    if allowed and not huggingface_hub.constants.HF_HUB_OFFLINE:
        fetch_model(model_id, cache_dir)
