"""Kernel event sources that tell a detector "sample now", instead of waiting for its timer.

Theory of operation: a detector that can listen (process death by pidfd, a log file by
inotify, memory pressure by a PSI trigger) owns a :class:`Wakeup`, an epoll set holding
its kernel file descriptors. The trio shell waits on that one epoll fd with
``trio.lowlevel.wait_readable`` (no thread per file, no thread at all while waiting),
then calls the detector's ``drain()`` (non-blocking: it consumes what the kernel queued
and says whether it concerns the detector), then samples at once. The sample itself is
the detector's usual ``sample()``, so an event and a timer tick produce the same
observation, judged by the same scorer and fed to the same mission engine: events only
make the sample earlier. Every detector still samples on its interval too (the polling
fallback, and what ends a mission once the fault is gone).

An epoll fd nested in trio's own epoll suits every kind of fd here, EPOLLPRI ones (PSI
triggers) included, which trio cannot wait on by itself.
"""

from __future__ import annotations

import select

from inotify_simple import Event, INotify

POLL = "poll"
"""The mode of a detector that only samples on its interval. A detector that listens says
how instead (``pidfd``, ``inotify``, ``psi-trigger``) in its ``mode``; one that could not
says why in its ``mode_note``."""


class Wakeup:
    """An epoll set of kernel fds whose readiness means "sample now"; owns no fd but its own."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._fds: set[int] = set()

    def fileno(self) -> int:
        return self._ep.fileno()

    def add(self, fd: int, mask: int = select.EPOLLIN) -> None:
        self._ep.register(fd, mask)
        self._fds.add(fd)

    def discard(self, fd: int) -> None:
        """Stop watching ``fd`` (before closing it)."""
        if fd in self._fds:
            self._fds.discard(fd)
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def ready(self) -> list[tuple[int, int]]:
        """The (fd, events) ready now; never blocks."""
        try:
            return self._ep.poll(0)
        except ValueError:  # closed
            return []

    def close(self) -> None:
        self._fds.clear()
        self._ep.close()


class Watches:
    """One inotify fd (the ``inotify_simple`` binding) in a :class:`Wakeup` of its own: the
    log and cgroup detectors' event source. Make it with :meth:`listen`."""

    def __init__(self) -> None:
        self.inotify = INotify(nonblocking=True)
        self.wakeup = Wakeup()
        self.wakeup.add(self.inotify.fileno())

    @classmethod
    def listen(cls, path: str, mask: int) -> tuple[Watches | None, int, str]:
        """(watches, the first watch's descriptor, "") watching ``path``; or (None, -1,
        why not) where inotify is unavailable (the detector then polls)."""
        watches = None
        try:
            watches = cls()
            return watches, watches.inotify.add_watch(path, mask), ""
        except OSError as exc:
            if watches is not None:
                watches.close()
            return None, -1, f"no inotify: {exc.strerror or exc}"

    def events(self) -> list[Event]:
        """What the kernel queued; never blocks."""
        try:
            return list(self.inotify.read(timeout=0))
        except BlockingIOError:
            return []

    def close(self) -> None:
        self.inotify.close()
        self.wakeup.close()
