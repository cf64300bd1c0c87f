"""Starting a client's ``*_async`` calls at once and in call order.

Owns the rule that an ``*_async`` call returns its ``Future`` without blocking
the caller: errors of the call (a bad gradient, an unknown key) come out of the
Future, never out of the call. Most calls are sent on the calling thread right
away. A call that must first ask the cluster something (the shape and dtype of
a key this client has not used yet) is handed to one starter thread, which
asks, sends the call, and links the call's result to the Future it returned.
Calls keep their order: while any call waits on the starter thread, later
``*_async`` calls queue behind it, and a synchronous call first waits until the
queue has been sent (``flush``), so that a pull never overtakes the push issued
before it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pserver.protocol.errors import PServerError, Unavailable

from .io import Completion


def _failed(exc: BaseException) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_exception(exc)
    return future


def _future(started: Completion[Any] | Future[Any]) -> Future[Any]:
    return started if isinstance(started, Future) else started.as_future()


def _link(inner: Future[Any], outer: Future[Any]) -> None:
    """Complete ``outer`` as ``inner`` completes."""

    def copy(done: Future[Any]) -> None:
        exc = done.exception()
        if exc is not None:
            outer.set_exception(exc)
        else:
            outer.set_result(done.result())

    inner.add_done_callback(copy)


class AsyncStarter:
    """The starter thread of one client (created on first use) and its queue."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queued = 0  # calls handed to the starter thread and not yet sent
        self._pool: ThreadPoolExecutor | None = None
        self._thread: int | None = None
        self._closed = False

    def start(self, ready: Callable[[], bool],
              build: Callable[[], Completion[Any] | Future[Any]]) -> Future[Any]:
        """Send the call ``build`` makes and return its Future. ``ready()`` says
        whether ``build`` can run without a round trip (it must not raise); when it
        cannot, or when earlier calls are queued, the call is queued too."""
        with self._cond:
            if self._closed:
                return _failed(PServerError("the client is closed"))
            now = self._queued == 0 and ready()
            if not now:
                self._queued += 1
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        1, thread_name_prefix="pserver-async-start", initializer=self._mark)
                pool = self._pool
        if now:
            try:
                return _future(build())
            except PServerError as exc:
                return _failed(exc)
        outer: Future[Any] = Future()
        pool.submit(self._send, build, outer)
        return outer

    def _mark(self) -> None:
        self._thread = threading.get_ident()

    def _send(self, build: Callable[[], Completion[Any] | Future[Any]],
              outer: Future[Any]) -> None:
        try:
            try:
                inner = _future(build())
            except BaseException as exc:  # the caller left long ago: the Future carries it
                outer.set_exception(exc)
                return
            _link(inner, outer)
        finally:
            with self._cond:
                self._queued -= 1
                self._cond.notify_all()

    def flush(self, timeout: float) -> None:
        """Wait until every queued call has been sent (a no-op on the starter thread
        itself, whose own round trips come first). Raises ``Unavailable`` when that
        takes longer than ``timeout`` seconds."""
        if not self._queued or self._thread == threading.get_ident():
            return  # (read without the lock: a call another thread starts meanwhile is
            # concurrent with this one, and has no order with it to keep)
        with self._cond:
            if not self._cond.wait_for(lambda: self._queued == 0, timeout):
                raise Unavailable(f"earlier *_async calls were not sent within {timeout:g} s")

    def close(self) -> None:
        """Let the queued calls run (they fail at once on a closed client), then stop
        the thread."""
        with self._cond:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
