"""The bot's counters for Prometheus (METRICS_PORT) and for `/mod stats`, from one registry.

Each service has a registry of its own, not prometheus_client's global one, so a test process
can hold several bots. Figures that are a view of live state (queue depth per key, each
worker's busy share and resident models) are read when scraped. The endpoint is served on the
event loop (aiohttp), because those reads walk the queue index, which only the loop may touch.
"""

from __future__ import annotations

import functools
import inspect
import re
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as exposition
from prometheus_client.core import GaugeMetricFamily, Metric

from bot.quota import AdmissionRefused
from bot.requests import InvalidRequest, Job

if TYPE_CHECKING:
    from bot.queue import QueueIndex

SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
FILL = (0.125, 0.25, 0.5, 0.75, 0.999, 1.0)


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
        counts apart; `queue` gives the queue depth when scraped."""
        self.registry = CollectorRegistry()
        self._queue = queue
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

    async def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Serve /metrics (any path) on `port` until `close()`."""
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._scrape)
        self._server = web.AppRunner(app, access_log=None)
        await self._server.setup()
        await web.TCPSite(self._server, host, port).start()

    async def _scrape(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=exposition(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def close(self) -> None:
        if self._server is not None:
            await self._server.cleanup()
            self._server = None


class _LiveState:
    """Gauges read at scrape time: queue depth per batch key, each worker's share of the time
    since start spent running batches, and the models each worker holds."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        """The gauges as they stand now, read from the queue and the lanes."""
        m = self._metrics
        depth = GaugeMetricFamily(
            "imagine_queue_jobs",
            "Queued jobs per batch key",
            labels=["model", "mode", "size", "steps", "scheduler"],
        )
        if m._queue is not None:
            keys = Tally(job.request.batch_key for job in m._queue.page(0, len(m._queue)))
            for key, jobs in sorted(keys.items(), key=lambda item: str(item[0])):
                size = f"{key.width}x{key.height}"
                depth.add_metric([key.model, key.mode, size, str(key.steps), key.scheduler], jobs)
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
