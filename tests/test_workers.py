"""EXECUTOR=ray through the fake Discord: two CPU workers on a local Ray cluster (one core and
one torch thread each) answer /imagine with the pixels the local runner makes for the seed, and
a worker killed, or stopped past WORKER_TIMEOUT, in the middle of a call loses no job and
delivers each exactly once, while a call longer than WORKER_TIMEOUT that keeps stepping runs
on. One bot for all of it: starting Ray workers takes seconds. The cluster is started as the
bot starts one, from an environment with a bot token, an owner's RAY_AUTH_MODE=disabled and a
token file others may read: it listens on loopback only, refuses clients without its token,
keeps that token private and never hands a secret to a Ray process."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import stat
from dataclasses import replace

import numpy as np
import psutil
import pytest
from factories import pixels
from harness.answers import attachment_names
from harness.in_process import running_bot

from bot.db import jobs
from bot.ray_cluster import (
    RayNotSecure,
    answers_client,
    connect_ray,
    join_cluster,
    private_token_file,
    refuses_strangers,
    secret_names,
)

ray = pytest.importorskip("ray")

BOT_TOKEN = "MTIz.bot-token-that-must-stay-in-the-bot"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray instance for the module, started by connect_ray as the bot starts one
    (the bot finds it initialised and uses it), from a hostile environment: the bot's token,
    RAY_AUTH_MODE=disabled, and a token file that other users may read. Yields that file."""
    token = tmp_path_factory.mktemp("ray") / "auth_token"
    token.write_text("0123456789abcdef" * 4)
    token.chmod(0o644)
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("DISCORD_TOKEN", BOT_TOKEN)
        environment.setenv("RAY_AUTH_MODE", "disabled")
        environment.setenv("RAY_AUTH_TOKEN_PATH", str(token))
        environment.delenv("RAY_AUTH_TOKEN", raising=False)
        connect_ray(None, 2)
        yield token
        ray.shutdown()


def ray_processes(worker_pid: int) -> list[psutil.Process]:
    """The processes this one started for Ray (GCS, raylet, agents, workers), checked to
    include the core ones and the worker whose pid is given."""
    processes = psutil.Process().children(recursive=True)
    names = {process.name() for process in processes}
    assert {"gcs_server", "raylet"} <= names
    assert worker_pid in {process.pid for process in processes}
    return processes


@ray.remote
def worker_pid() -> int:
    return os.getpid()


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def bound_sockets(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every socket of `processes` that listens (TCP) or is
    bound and unconnected (UDP)."""
    return [
        (process.name(), connection.laddr.ip, connection.laddr.port)
        for process in processes
        for connection in process.net_connections(kind="inet")
        if not connection.raddr
    ]


def test_a_local_cluster_is_on_loopback_without_secrets_and_refuses_clients_without_its_token(
    ray_cluster,
):
    """One test, since a cluster takes seconds to start. Ray's GCS, raylet, agents and workers,
    and the bot's own Ray core worker, listen on 127.0.0.1 alone; none of Ray's processes
    holds the bot's token, which the bot keeps; a client that sends no token is refused
    though the owner's environment said RAY_AUTH_MODE=disabled, and one with it is answered;
    the token file, readable by others before, is 0600."""
    processes = ray_processes(ray.get(worker_pid.remote()))
    bound = bound_sockets([psutil.Process(), *processes])
    assert bound and [socket for socket in bound if not is_loopback(socket[1])] == []
    for process in processes:
        environment = process.environ()
        assert "DISCORD_TOKEN" not in environment, process.name()
        assert BOT_TOKEN not in "\n".join(environment.values()), process.name()
    assert os.environ["DISCORD_TOKEN"] == BOT_TOKEN
    gcs = ray.get_runtime_context().gcs_address
    assert refuses_strangers(gcs) is True
    assert answers_client(gcs, {**os.environ, "RAY_AUTH_MODE": "token"}) is True
    assert stat.S_IMODE(ray_cluster.stat().st_mode) == 0o600


def test_secrets_are_found_by_the_words_of_their_names():
    secret = ["DISCORD_TOKEN", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "OPENAI_API_KEY"]
    harmless = ["TOKENIZERS_PARALLELISM", "RAY_AUTH_TOKEN", "PATH", "KEYBOARD", "MONKEY"]
    assert secret_names(dict.fromkeys(secret + harmless, "x")) == secret


def test_a_token_file_is_made_private_and_none_is_made_for_joining(tmp_path):
    made = private_token_file(tmp_path / "new" / ".ray" / "auth_token", create=True)
    other = private_token_file(tmp_path / "other", create=True)
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.parent.stat().st_mode) == 0o700
    assert len(made.read_text()) == 64 and made.read_text() != other.read_text()
    with pytest.raises(RayNotSecure, match="no Ray token"):
        private_token_file(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


def test_a_cluster_that_accepts_clients_without_a_token_is_not_joined(monkeypatch, tmp_path):
    class NoRay:
        def init(self, **options):
            raise AssertionError("joined")

    monkeypatch.setattr("bot.ray_cluster.refuses_strangers", lambda address: False)
    with pytest.raises(RayNotSecure, match="accepts clients without a token"):
        join_cluster(NoRay(), "10.0.0.7:6379")
    # One that refuses them is joined only with the token in hand.
    monkeypatch.setattr("bot.ray_cluster.refuses_strangers", lambda address: True)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    with pytest.raises(RayNotSecure, match="no Ray token"):
        join_cluster(NoRay(), "10.0.0.7:6379")


async def lane_running(service, job_id: int, timeout: float = 60.0):
    """The lane whose worker is running `job_id`, once a step of its call was heard."""
    heard = asyncio.Event()

    def listener(job_ids, done, total, previews):
        if job_id in job_ids:
            heard.set()

    service.add_progress_listener(listener)
    try:
        await asyncio.wait_for(heard.wait(), timeout)
    finally:
        service.remove_progress_listener(listener)
    [lane] = [lane for lane in service.executor.lanes if job_id in lane.in_flight]
    return lane


async def two_jobs_through_a_fault(running, world, tiny_runner, seeds, fault):
    """Two jobs of different sizes, so both workers run one; `fault(pid)` hits the worker of
    the first at its first step. Each is delivered exactly once, with the seed's pixels, and the
    first was claimed twice (lost with its worker, then run by the other)."""
    first = await running.imagine(world.alice, prompt="a lighthouse", seed=seeds[0], width=128)
    second = await running.imagine(world.bob, prompt="a harbour", seed=seeds[1], height=128)
    records = [await running.queued_job(inter) for inter in (first, second)]
    lane = await lane_running(running.service, records[0].job.id)
    fault(lane.worker.pid)
    await running.wait_idle(timeout=120)
    for inter, record in zip((first, second), records, strict=True):
        seed = record.job.request.seed
        posted = [m for m in world.fake.messages if attachment_names(m) == [f"seed-{seed}.png"]]
        assert len(posted) == 1
        assert (await inter.wait_followup(1)).id == posted[0].id
        [expected] = tiny_runner.generate(record.job.request.batch_key, record.job.image_specs)
        assert np.array_equal(pixels(posted[0].attachments[0]), pixels(expected))
        assert (await running.store.read(jobs.get, record.job.id)).job.status == "done"
    assert (await running.store.read(jobs.get, records[0].job.id)).job.attempts == 2
    return lane


async def a_long_call_that_keeps_stepping_runs_on(running, world, timeout: float):
    """WORKER_TIMEOUT bounds the silence between steps, not the call: a call longer than it
    that keeps stepping is delivered once, on its first attempt."""
    inter = await running.imagine(
        world.alice, prompt="a long one", seed=41, count=4, steps=40, width=256, height=256
    )
    record = await running.queued_job(inter)
    await lane_running(running.service, record.job.id)
    started = asyncio.get_running_loop().time()
    await running.wait_idle(timeout=120)
    assert asyncio.get_running_loop().time() - started > timeout  # the test's premise
    assert len((await inter.wait_followup(1)).attachments) == 5  # the grid and four images
    done = (await running.store.read(jobs.get, record.job.id)).job
    assert (done.status, done.attempts) == ("done", 1)


async def cancel_stops_the_call_on_its_worker(running, world):
    """Cancel reaches the call on the worker: it stops within a step or two, not at its end."""
    steps = []
    running.service.add_progress_listener(lambda ids, done, total, previews: steps.append(done))
    inter = await running.imagine(world.alice, prompt="a long one", seed=31, steps=20, width=256)
    record = await running.queued_job(inter)
    await lane_running(running.service, record.job.id)
    assert await running.service.cancel(record.job.id) is jobs.CancelOutcome.STOPPING
    await running.wait_idle(timeout=60)
    assert (await running.store.read(jobs.get, record.job.id)).job.status == "cancelled"
    assert max(steps) < 20


async def test_ray_workers_give_the_seeds_pixels_through_a_killed_and_a_hung_worker(
    ray_cluster, discord_world, settings, tiny_runner
):
    settings = replace(
        settings,
        executor="ray",
        ray_workers=2,
        worker_timeout=6.0,
        limits=replace(settings.limits, default_steps=12, max_steps=40),
    )
    stopped: list[int] = []

    def hang(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    try:
        async with running_bot(discord_world.fake, settings, runner=tiny_runner) as running:
            killed = await two_jobs_through_a_fault(
                running, discord_world, tiny_runner, (11, 12), lambda pid: os.kill(pid, 9)
            )
            old_pid = killed.worker.pid
            while killed.worker.pid == old_pid:  # until Ray has started it again
                await asyncio.sleep(0.1)
            # A worker that stops answering (hung, or its machine gone quiet) is killed after
            # WORKER_TIMEOUT and its jobs run elsewhere.
            await two_jobs_through_a_fault(running, discord_world, tiny_runner, (21, 22), hang)
            await a_long_call_that_keeps_stepping_runs_on(
                running, discord_world, settings.worker_timeout
            )
            await cancel_stops_the_call_on_its_worker(running, discord_world)
            figures = running.service.metrics.figures()
    finally:
        for pid in stopped:  # Ray kills it; if not yet, let it go
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert figures.images == 8 and figures.calls == 5  # the cancelled call made no image
    assert figures.resident == {"ray-0": ["tiny"], "ray-1": ["tiny"]}


def test_one_worker_per_gpu_or_ray_workers_cpu_workers():
    from bot.ray_workers import RayPlan, ray_plan

    assert ray_plan(4, None) == RayPlan(4, gpus=True)
    assert ray_plan(4, 2) == RayPlan(2, gpus=True)  # RAY_WORKERS caps the GPUs used
    assert ray_plan(0, None) == RayPlan(1, gpus=False)
    assert ray_plan(0, 2) == RayPlan(2, gpus=False)
