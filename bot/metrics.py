"""The bot's counters for Prometheus (METRICS_PORT) and for `/mod stats`, from one registry.

Each service has a registry of its own, not prometheus_client's global one, so a test process
can hold several bots. Queue depth per batch key is kept as the queue index changes
(`KeyDepths`), so a scrape costs the same however long the queue; each worker's busy share and
resident models are read when scraped. The endpoint is served on the event loop (aiohttp),
because the queue index and the depths belong to the loop. It has no authentication: it
listens on loopback unless the owner sets METRICS_HOST.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import inspect
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as exposition
from prometheus_client.core import GaugeMetricFamily, Metric

from bot.quota import AdmissionRefused
from bot.requests import BatchKey, InvalidRequest, Job

if TYPE_CHECKING:
    from bot.queue import QueueIndex

log = logging.getLogger(__name__)

SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
FILL = (0.125, 0.25, 0.5, 0.75, 0.999, 1.0)
# Members choose most of a batch key, so the queue depth gauge has a series for the deepest
# QUEUE_SERIES keys and one "other" series for the rest, however many keys are queued.
QUEUE_SERIES = 20
# One label per batch key field, so two different keys are never the same series.
KEY_LABELS = tuple(field.name for field in fields(BatchKey))
OTHER = tuple("other" for _ in KEY_LABELS)
# Scrapes answered at once; more are answered 503 at once instead of waiting on the loop.
MAX_SCRAPES = 4


def reason_of(refusal: BaseException) -> str:
    """A refusal's label: its class name in snake case (QuotaExceeded -> quota_exceeded)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(refusal).__name__).lower()


REFUSALS = (AdmissionRefused, InvalidRequest)


def counting_refusals(method: Callable[..., Any]) -> Callable[..., Any]:
    """A service method whose refusals (admission's, or a bad option) are counted by reason
    in `self.metrics` on their way to the member."""
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def checked_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await method(self, *args, **kwargs)
            except REFUSALS as refusal:
                self.metrics.refused(refusal)
                raise

        return checked_async

    @functools.wraps(method)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except REFUSALS as refusal:
            self.metrics.refused(refusal)
            raise

    return checked


def key_labels(key: BatchKey) -> tuple[str, ...]:
    """A batch key's label values, in KEY_LABELS order."""
    return tuple(_label_text(getattr(key, name)) for name in KEY_LABELS)


def _label_text(value: object) -> str:
    """A key field exactly (floats as Python writes them), LoRAs as `name:weight,…`."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(f"{name}:{weight}" for name, weight in value)
    return str(value)


class KeyDepths:
    """Queued jobs per batch key, ranked as they change (`QueueIndex.watch_depths`), so the
    deepest keys are read without a walk: keys by depth, and the depths some key has, sorted."""

    def __init__(self) -> None:
        self.jobs = 0
        self._depth: dict[BatchKey, int] = {}
        self._keys_at: dict[int, dict[BatchKey, None]] = {}
        self._levels: list[int] = []

    def __call__(self, key: BatchKey, depth: int) -> None:
        """`key` now has `depth` jobs queued (0: none)."""
        old = self._depth.pop(key, 0)
        if old:
            at = self._keys_at[old]
            del at[key]
            if not at:
                del self._keys_at[old]
                del self._levels[bisect.bisect_left(self._levels, old)]
        if depth:
            self._depth[key] = depth
            if depth not in self._keys_at:
                self._keys_at[depth] = {}
                bisect.insort(self._levels, depth)
            self._keys_at[depth][key] = None
        self.jobs += depth - old

    def __len__(self) -> int:
        return len(self._depth)

    def deepest(self, count: int) -> list[tuple[BatchKey, int]]:
        """At most `count` (key, depth) pairs, deepest first: a step per pair returned."""
        found: list[tuple[BatchKey, int]] = []
        for depth in reversed(self._levels):
            for key in self._keys_at[depth]:
                if len(found) == count:
                    return found
                found.append((key, depth))
        return found


@dataclass(frozen=True)
class Figures:
    """What `/mod stats` shows from the counters, since the bot started."""

    images: int
    calls: int
    mean_fill: float | None
    mean_wait: float | None
    mean_generation: float | None
    busy_share: dict[str, float]
    resident: dict[str, list[str]]
    refusals: dict[str, int]


class Metrics:
    """The counters the executor and admission bump; `serve(port)` exposes them."""

    def __init__(self, queue: QueueIndex | None = None) -> None:
        """Counters and histograms in a registry of their own, so each service (and each test)
        counts apart; `queue` tells the depth per key as it changes."""
        self.registry = CollectorRegistry()
        self.depths = KeyDepths()
        if queue is not None:
            queue.watch_depths(self.depths)
        self.scrape_slots = asyncio.Semaphore(MAX_SCRAPES)
        self._lanes: Sequence[Any] = ()
        self._started = time.monotonic()
        r = self.registry
        self.images = Counter("imagine_images", "Images generated", ["worker"], registry=r)
        self.calls = Counter("imagine_calls", "Diffusers calls", ["worker"], registry=r)
        self.busy_seconds = Counter(
            "imagine_worker_busy_seconds", "Seconds a worker ran batches", ["worker"], registry=r
        )
        self.lost = Counter(
            "imagine_workers_lost", "Calls lost with their worker", ["worker"], registry=r
        )
        self.refusals = Counter(
            "imagine_refusals", "Requests refused, by reason", ["reason"], registry=r
        )
        self.fill = Histogram(
            "imagine_batch_fill", "Images claimed per call over the key's cap", buckets=FILL,
            registry=r,
        )  # fmt: skip
        self.wait = Histogram(
            "imagine_wait_seconds", "From admission to claim", buckets=SECONDS, registry=r
        )
        self.generation = Histogram(
            "imagine_generation_seconds", "One diffusers call", buckets=SECONDS, registry=r
        )
        r.register(_LiveState(self))
        self._server: web.AppRunner | None = None

    # ---- what happens ---------------------------------------------------------------------

    def claimed(self, batch: Iterable[Job], cap: int) -> None:
        """A batch left the queue: its fill, and how long each job waited."""
        now = time.time()
        batch = list(batch)
        self.fill.observe(sum(job.request.count for job in batch) / max(1, cap))
        for job in batch:
            self.wait.observe(max(0.0, now - job.queued_at))

    def called(self, worker: str, images: int, seconds: float) -> None:
        self.calls.labels(worker).inc()
        self.images.labels(worker).inc(images)
        self.generation.observe(seconds)

    def busy(self, worker: str, seconds: float) -> None:
        self.busy_seconds.labels(worker).inc(seconds)

    def worker_lost(self, worker: str) -> None:
        self.lost.labels(worker).inc()

    def refused(self, refusal: BaseException) -> None:
        self.refusals.labels(reason_of(refusal)).inc()

    def watch_workers(self, lanes: Sequence[Any]) -> None:
        """The executor's lanes (`lane.worker.name`, `.resident_models()`), read when scraped."""
        self._lanes = lanes

    # ---- reading them back ----------------------------------------------------------------

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample as the endpoint renders it: (name, sorted labels) -> value."""
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in self.registry.collect()
            for s in metric.samples
        }

    def figures(self) -> Figures:
        """The `/mod stats` figures, from the same samples the endpoint serves."""
        by_name: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for (name, labels), value in self.samples().items():
            by_name.setdefault(name, {})[labels] = value

        def total(name: str) -> float:
            return sum(by_name.get(name, {}).values())

        def mean(name: str) -> float | None:
            count = total(f"{name}_count")
            return total(f"{name}_sum") / count if count else None

        def per(name: str, label: str) -> dict[str, float]:
            return {dict(labels)[label]: v for labels, v in by_name.get(name, {}).items()}

        resident: dict[str, list[str]] = {}
        for labels in by_name.get("imagine_worker_resident_model", {}):
            named = dict(labels)
            resident.setdefault(named["worker"], []).append(named["model"])
        return Figures(
            images=int(total("imagine_images_total")),
            calls=int(total("imagine_calls_total")),
            mean_fill=mean("imagine_batch_fill"),
            mean_wait=mean("imagine_wait_seconds"),
            mean_generation=mean("imagine_generation_seconds"),
            busy_share=per("imagine_worker_busy_share", "worker"),
            resident={worker: sorted(models) for worker, models in resident.items()},
            refusals={k: int(v) for k, v in per("imagine_refusals_total", "reason").items()},
        )

    # ---- the endpoint ---------------------------------------------------------------------

    async def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Serve GET /metrics (every other path is 404) on `host`:`port` until `close()`."""
        app = web.Application()
        app.router.add_get("/metrics", self.scrape)
        self._server = web.AppRunner(app, access_log=None)
        await self._server.setup()
        await web.TCPSite(self._server, host, port).start()
        log.info("metrics at http://%s:%d/metrics (no authentication)", host, port)

    @property
    def addresses(self) -> list[Any]:
        """The socket addresses the endpoint listens on (none before `serve`)."""
        return [] if self._server is None else list(self._server.addresses)

    async def scrape(self, request: web.Request) -> web.StreamResponse:
        """The registry rendered, holding one of the `scrape_slots` until it is sent; with
        every slot taken, 503 at once."""
        if self.scrape_slots.locked():
            return web.Response(status=503, text="busy\n", headers={"Retry-After": "1"})
        async with self.scrape_slots:
            body = exposition(self.registry)
            response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE_LATEST})
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body)
            await response.write_eof()
            return response

    async def close(self) -> None:
        if self._server is not None:
            await self._server.cleanup()
            self._server = None


class _LiveState:
    """Gauges read at scrape time: queue depth of the deepest batch keys (and the rest as
    "other"), each worker's share of the time since start spent running batches, and the
    models each worker holds."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        """The gauges as they stand now, read from the queue and the lanes."""
        m = self._metrics
        depth = GaugeMetricFamily(
            "imagine_queue_jobs",
            f"Queued jobs per batch key, the {QUEUE_SERIES} deepest keys and the rest as other",
            labels=KEY_LABELS,
        )
        deepest = m.depths.deepest(QUEUE_SERIES)
        for key, jobs in deepest:
            depth.add_metric(key_labels(key), jobs)
        if len(m.depths) > len(deepest):
            depth.add_metric(OTHER, m.depths.jobs - sum(jobs for _, jobs in deepest))
        yield depth
        share = GaugeMetricFamily(
            "imagine_worker_busy_share",
            "Share of the time since start spent busy",
            labels=["worker"],
        )
        resident = GaugeMetricFamily(
            "imagine_worker_resident_model", "Models loaded on a worker", labels=["worker", "model"]
        )
        elapsed = max(1e-9, time.monotonic() - m._started)
        busy = {
            dict(s.labels)["worker"]: s.value
            for metric in m.busy_seconds.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        }
        for lane in m._lanes:
            name = lane.worker.name
            share.add_metric([name], min(1.0, busy.get(name, 0.0) / elapsed))
            for model in sorted(lane.worker.resident_models()):
                resident.add_metric([name, model], 1)
        yield share
        yield resident
