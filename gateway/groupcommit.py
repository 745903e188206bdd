"""Group commit of message writes: several sessions' inserts in one round trip.

Natural batching, no timers. When no write is in flight an insert is sent at once,
alone, by its caller: the one-row `omnigate_insert_message` (migrations/0004), with
no task in between, so one session's latency does not grow. While a write is in
flight new inserts queue, and when it returns the next flush takes everything queued
(up to `max_batch`) as one autocommit statement, `omnigate_insert_messages`
(migrations/0006): when it returns every row in it is committed, and each caller's
future is resolved only then. A row that failed in the batch (its conversation was
erased, say) is tried once more alone, so its caller gets the database's own error
and the others are untouched; a failed round trip fails every caller of that batch.

The committer has at most one statement in flight, so it keeps one pooled connection
between writes instead of checking one out per statement: a checkout and its return
cost ~60 µs of the gateway's CPU (asyncpg returns a connection through a task of its
own), twice per visitor message at low load. A cancellation or any error but the
server's refusal of a statement hands the connection back to the pool, which waits out
a cancelled query and replaces a broken connection; so does a connection found closed
before a write. The next write takes a fresh one. `aclose` hands it back for good.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from gateway import store
from gateway.db import Pool
from gateway.store import NewMessage

T = TypeVar("T")

_INSERT_MESSAGES = (
    "SELECT ord, seq, failed FROM omnigate_insert_messages("
    "$1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::bytea[], $6::bigint[],"
    " $7::text[], $8::text[], $9::bytea[], $10::bytea[], $11::boolean[], $12::bytea[])"
)


def _usable(conn: Any) -> bool:
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:  # the pool took the proxy back when its connection closed
        return False


class StorageError(OSError):
    """This message's write was rolled back by the database (the others in its batch were not)."""


class GroupCommitter:
    """Batches `store.insert_message` calls of concurrent sessions into one statement."""

    def __init__(self, pool: Pool, *, max_batch: int = 64, max_pending: int = 1024) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._queue: list[tuple[NewMessage, asyncio.Future[int | None]]] = []
        self._slots = asyncio.Semaphore(max_pending)  # queued + in flight; beyond, callers wait
        self._task: asyncio.Task[None] | None = None
        self._alone = False  # a caller's own write is in flight
        self._conn: Any = None  # the pooled connection kept between writes (a proxy)
        self._closing = False  # after aclose: every write checks a connection out alone
        self.batches = 0  # round trips sent
        self.rows = 0  # rows sent

    async def insert(self, msg: NewMessage) -> int | None:
        """Insert a message once it is committed; its seq, or None when client_ref existed."""
        async with self._slots:
            if self._task is None and not self._alone:
                return await self._insert_now(msg)
            fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
            self._queue.append((msg, fut))
            # shielded: a cancelled caller must not cancel a batch that carries other rows
            return await asyncio.shield(fut)

    async def _insert_now(self, msg: NewMessage) -> int | None:
        # Alone, in the caller's task: 0.17 ms sooner than through a one-row batch
        # (measured in docs/performance.md). Cancelled with its caller, the write may
        # or may not commit, as a batch's could: nothing was acknowledged for it.
        self._alone = True
        self.batches += 1
        self.rows += 1
        try:
            return await self._statement(lambda conn: store.insert_message(conn, msg))
        finally:
            self._alone = False
            if self._queue and self._task is None:
                self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._flush(batch)
        finally:
            self._task = None

    async def _flush(self, batch: list[tuple[NewMessage, asyncio.Future[int | None]]]) -> None:
        columns: list[list[Any]] = [
            list(c) for c in zip(*(m.args() for m, _ in batch), strict=True)
        ]
        self.batches += 1
        self.rows += len(batch)
        try:
            records = await self._statement(lambda conn: conn.fetch(_INSERT_MESSAGES, *columns))
        except Exception as exc:  # every caller of the batch gets the error
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        except BaseException:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(StorageError("message write interrupted"))
            raise
        results = {r["ord"]: r for r in records}
        for i, (msg, fut) in enumerate(batch, start=1):
            if fut.done():
                continue
            r = results.get(i)
            if r is None or r["failed"]:
                # alone, so the caller gets the database's own error (and a second chance)
                await self._retry_alone(msg, fut)
            elif r["seq"] == store.MAP_CHANGED:
                fut.set_exception(store.MapChanged())
            else:
                fut.set_result(r["seq"])

    async def _retry_alone(self, msg: NewMessage, fut: asyncio.Future[int | None]) -> None:
        try:
            seq = await self._statement(lambda conn: store.insert_message(conn, msg))
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(seq)

    async def _statement(self, run: Callable[[Any], Awaitable[T]]) -> T:
        """Run one statement on the kept connection (only one is ever in flight)."""
        conn = self._conn
        if conn is None or not _usable(conn):
            await self._give_back()
            if self._closing:
                return await run(self._pool)
            conn = self._conn = await self._pool.acquire()
        try:
            return await run(conn)
        except (asyncpg.PostgresError, store.MapChanged):
            raise  # the server refused or declined the statement: the connection is sound
        except BaseException:
            await self._give_back()  # the pool waits out a cancelled query or drops a broken one
            raise
        finally:
            if self._closing:
                await self._give_back()

    async def _give_back(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self._pool.release(conn)

    async def aclose(self) -> None:
        """Wait for the writes already queued, then give the kept connection back.

        New writes may still come and are written too, each on a connection of its own,
        so the pool can close.
        """
        self._closing = True
        while (task := self._task) is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
            if self._task is task:
                break
        if not self._alone and self._task is None:
            await self._give_back()  # else the write in flight gives it back when it ends
