"""One read-only SQLite connection shared by trio tasks, one worker thread at a time.

Opened on first use and kept until :meth:`SharedReader.close`: a connection per read
costs a connect each time, and SQLite's unix VFS parks a closed connection's
descriptor while another connection in the process holds a lock on the file (a
descriptor that comes and goes with the traffic). A first read at start-up opens the
WAL handles too, so graced's descriptor count is steady from then on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import trio


class _Closable(Protocol):
    def close(self) -> None: ...


R = TypeVar("R", bound=_Closable)
T = TypeVar("T")


class SharedReader(Generic[R]):
    """Runs ``fn(reader)`` in a worker thread on one connection, callers taking turns."""

    def __init__(self, open_reader: Callable[[], R]) -> None:
        self._open = open_reader
        self._reader: R | None = None
        self._lock = trio.Lock()

    async def run(self, fn: Callable[[R], T]) -> T:
        async with self._lock:
            return await trio.to_thread.run_sync(self._call, fn)

    def _call(self, fn: Callable[[R], T]) -> T:
        if self._reader is None:
            self._reader = self._open()
        return fn(self._reader)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
