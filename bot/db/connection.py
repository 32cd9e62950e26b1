"""Opening the database and running transactions on it.

One aiosqlite connection in autocommit mode; every transaction runs under one asyncio lock,
because aiosqlite serialises statements but not transactions, and two coroutines must never
interleave their BEGIN ... COMMIT on the same connection. The concern modules beside this one
(jobs, quotas, moderation, members, speeds, admission) are plain functions of an open `Tx`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiosqlite

from bot.db.schema import MIGRATIONS

P = ParamSpec("P")
T = TypeVar("T")


class Tx:
    """An open transaction. `now` is read from the clock once, when first needed: every row
    the transaction stamps gets that one time."""

    def __init__(self, conn: aiosqlite.Connection, clock: Callable[[], float]) -> None:
        self.conn = conn
        self._clock = clock

    @functools.cached_property
    def now(self) -> float:
        return self._clock()

    async def run(self, sql: str, params: Iterable[Any] = ()) -> aiosqlite.Cursor:
        return await self.conn.execute(sql, tuple(params))

    async def run_many(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        await self.conn.executemany(sql, rows)

    async def one(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        return await (await self.run(sql, params)).fetchone()

    async def all(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return list(await (await self.run(sql, params)).fetchall())

    async def value(self, sql: str, params: Iterable[Any] = ()) -> Any:
        """The first column of the first row, or None."""
        row = await self.one(sql, params)
        return None if row is None else row[0]


class Store:
    """The SQLite file: open with `await Store.open(path)`, then `read` or `write` a concern
    function, e.g. `await store.write(jobs.mark_done, job_id)`."""

    def __init__(self, db: aiosqlite.Connection, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str, clock: Callable[[], float] = time.time) -> Store:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(path), isolation_level=None)
        db.row_factory = sqlite3.Row  # rows are read by column name
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA busy_timeout=5000")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA secure_delete=ON")  # deleted prompts are overwritten on disk
        store = cls(db, clock)
        await store._migrate()
        return store

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()

    async def read(
        self, query: Callable[Concatenate[Tx, P], Awaitable[T]], *args: P.args, **kw: P.kwargs
    ) -> T:
        """Run `query(tx, ...)` on one consistent snapshot."""
        async with self._transaction("BEGIN") as tx:
            return await query(tx, *args, **kw)

    async def write(
        self, change: Callable[Concatenate[Tx, P], Awaitable[T]], *args: P.args, **kw: P.kwargs
    ) -> T:
        """Run `change(tx, ...)` in one BEGIN IMMEDIATE transaction: it takes the write lock up
        front, so read-then-write cannot race; an exception rolls everything back."""
        async with self._transaction("BEGIN IMMEDIATE") as tx:
            return await change(tx, *args, **kw)

    @asynccontextmanager
    async def _transaction(self, begin: str) -> AsyncIterator[Tx]:
        """A caller cancelled anywhere inside (a shutdown) still leaves no transaction open:
        aiosqlite runs statements in order on its own thread, even those whose caller stopped
        waiting, so the ROLLBACK queued here runs after whatever it interrupted."""
        async with self._lock:
            try:
                await self._db.execute(begin)
                yield Tx(self._db, self._clock)
            except BaseException:
                # "no transaction is active" when BEGIN itself failed.
                with contextlib.suppress(sqlite3.OperationalError):
                    await asyncio.shield(self._db.execute("ROLLBACK"))
                raise
            await self._db.execute("COMMIT")

    async def checkpoint(self) -> None:
        """Move committed pages out of the write-ahead log (secure_delete has zeroed the
        deleted ones), so deleted text leaves the WAL file too."""
        async with self._lock:
            await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def _migrate(self) -> None:
        async with self._lock:
            version = await self._user_version()
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                # executescript commits on its own, so the version bump rides inside the script
                await self._db.executescript(
                    f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;"
                )

    async def schema_version(self) -> int:
        async with self._lock:
            return await self._user_version()

    async def _user_version(self) -> int:
        (version,) = await (await self._db.execute("PRAGMA user_version")).fetchone()
        return version
