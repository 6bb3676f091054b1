"""``SyncDispatcher``: dispatch from synchronous code (Django, Flask, scripts, plain threads).

The async transport runs on one background event-loop thread owned by the dispatcher; ``dispatch()`` hands the
work to that loop and blocks the calling thread until every queued listener's message is confirmed (or raises
the same errors as the async dispatcher). Any number of threads may dispatch at once: their publishes run
concurrently on the loop, over the transport's one connection.

::

    events = SyncDispatcher(app)             # one per process, e.g. at import time of your Flask app
    events.dispatch(OrderPlaced(order_id=42))
    ...
    events.close()                           # at shutdown: waits for in-flight dispatches, closes the transport

Context variables of the caller (``queueable.correlation_id``, a deferral or outbox scope) are visible to the
dispatch running on the loop.

.. versionadded:: 0.1
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Self, TypeVar

from queueable._app import App
from queueable._dispatcher import EventDispatcher, close_scope, open_scope
from queueable.errors import PublishError, TransportClosedError

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterator
    from types import TracebackType

__all__ = ["SyncDispatcher"]

log = logging.getLogger("queueable.sync")

E = TypeVar("E")
T = TypeVar("T")


class SyncDispatcher:
    """A blocking facade over an :class:`~queueable.App` (or an :class:`~queueable.EventDispatcher`).

    ``timeout`` bounds how long ``dispatch()`` waits (``None``: the transport's own publish timeout applies).
    ``close()`` (or leaving a ``with`` block) stops accepting dispatches, waits for those in flight, closes the
    transport (``close_transport=False`` leaves it open) and stops the loop thread. The loop thread starts on
    first use, so creating the dispatcher before a fork (gunicorn ``--preload``) is fine as long as nothing is
    dispatched before the fork.
    """

    def __init__(
        self,
        target: App | EventDispatcher,
        *,
        timeout: float | None = None,
        close_transport: bool = True,
        thread_name: str = "queueable-loop",
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.close_transport = close_transport
        self.thread_name = thread_name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._inflight: set[concurrent.futures.Future[Any]] = set()
        self._closed = False

    @property
    def dispatcher(self) -> EventDispatcher:
        """The async dispatcher doing the work (the app's current one)."""
        return self.target.dispatcher if isinstance(self.target, App) else self.target

    # -- dispatching -------------------------------------------------------------------------------

    def dispatch(self, event: E, *, defer: bool = False, timeout: float | None = None) -> E:
        """Dispatch ``event`` and block until its queued messages are confirmed; return the event.

        Raises what :meth:`EventDispatcher.dispatch` raises (``SerializationError``, ``PublishError``,
        ``ConfigurationError``, a listener's exception), and ``PublishError`` when ``timeout`` (or the
        dispatcher's default) passes first: the message may or may not exist then.
        """
        return self.run(self.dispatcher.dispatch(event, defer=defer), timeout=timeout)

    @contextlib.contextmanager
    def deferred(self, *, discard_on_error: bool = True) -> Iterator[None]:
        """The blocking form of :meth:`EventDispatcher.deferred`: buffer, then publish once at the end.

        ::

            with events.deferred():
                events.dispatch(OrderPlaced(...))     # serialized, not yet published
            # validated, published and confirmed here (SerializationError for an event its model rejects)
        """
        dispatcher = self.dispatcher
        scope, token = open_scope(dispatcher)
        try:
            yield
        except BaseException as exc:
            messages, rejected = close_scope(scope, token, keep=not discard_on_error)
            if rejected is not None:
                exc.add_note(str(rejected))
            if messages:
                self._publish(dispatcher, messages)
            raise
        messages, rejected = close_scope(scope, token, keep=True)
        try:
            if messages:
                self._publish(dispatcher, messages)
        except Exception as exc:
            if rejected is not None:
                exc.add_note(str(rejected))
            raise
        if rejected is not None:
            raise rejected

    def run(self, coro: Coroutine[Any, Any, T], *, timeout: float | None = None) -> T:
        """Run ``coro`` on the loop thread, in a copy of the caller's context, and return its result."""
        try:
            future = self._submit(coro)
        except BaseException:
            coro.close()
            raise
        limit = self.timeout if timeout is None else timeout
        try:
            return future.result(limit)
        except TimeoutError as exc:  # concurrent.futures.TimeoutError is TimeoutError since 3.11
            if future.done() and not future.cancelled():  # the coroutine's own (a listener's timeout=), or done
                return future.result()
            future.cancel()
            msg = f"not confirmed within {limit} s: the message may or may not have been published"
            raise PublishError(msg) from exc
        except concurrent.futures.CancelledError as exc:  # close() gave up waiting for it
            msg = "cancelled by close() before it was confirmed: the message may or may not have been published"
            raise PublishError(msg) from exc
        finally:
            with self._lock:
                self._inflight.discard(future)

    def _publish(self, dispatcher: EventDispatcher, messages: list[Any]) -> None:
        transport = dispatcher.transport
        assert transport is not None  # checked when the messages were buffered
        self.run(transport.publish(messages))

    # -- lifecycle ---------------------------------------------------------------------------------

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        # Under the lock, so close() either sees this dispatch in flight or refuses it: never cancels it half-way.
        with self._lock:
            loop = self._running_loop()
            future = asyncio.run_coroutine_threadsafe(coro, loop)  # copies the caller's contextvars
            self._inflight.add(future)
            return future

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop, started if needed; call with ``_lock`` held."""
        if self._closed:
            raise TransportClosedError("the SyncDispatcher is closed")
        if self._loop is not None and self._pid != os.getpid():
            # A forked child inherited the object but not the thread: start afresh. The parent's dispatches in
            # flight are not the child's: close() must not wait for futures nothing will complete here.
            self._loop = None
            self._thread = None
            self._inflight = set()
        if self._loop is None:
            loop = asyncio.new_event_loop()
            started = threading.Event()
            thread = threading.Thread(target=_run_loop, args=(loop, started), name=self.thread_name, daemon=True)
            thread.start()
            started.wait()
            self._loop, self._thread, self._pid = loop, thread, os.getpid()
        if self._thread is not None and threading.get_ident() == self._thread.ident:
            msg = "SyncDispatcher.dispatch() called on its own loop thread: use the async dispatcher there"
            raise RuntimeError(msg)
        return self._loop

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop accepting dispatches, wait for in-flight ones, close the transport, stop the loop thread.

        Idempotent. ``timeout`` bounds the wait for in-flight dispatches and the transport's close.
        """
        with self._lock:
            if self._thread is not None and threading.get_ident() == self._thread.ident:
                msg = "SyncDispatcher.close() called on its own loop thread"
                raise RuntimeError(msg)
            if self._closed:
                return
            self._closed = True
            loop, thread, inflight = self._loop, self._thread, list(self._inflight)
        if loop is None or thread is None or not thread.is_alive():
            return
        _done, pending = concurrent.futures.wait(inflight, timeout=timeout)
        if pending:
            log.warning("closing with %d dispatch(es) still waiting for confirms; cancelling them", len(pending))
            for future in pending:
                future.cancel()
        if self.close_transport:
            closing = asyncio.run_coroutine_threadsafe(self._close_transport(), loop)
            try:
                closing.result(timeout)
            except Exception:
                log.exception("closing the transport failed")
        asyncio.run_coroutine_threadsafe(_shutdown(loop), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()

    async def _close_transport(self) -> None:
        if isinstance(self.target, App):
            await self.target.close()
        elif self.target.transport is not None:
            await self.target.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._loop is not None else "idle")
        return f"<SyncDispatcher {state} inflight={len(self._inflight)} target={self.target!r}>"


def _run_loop(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(started.set)
    loop.run_forever()


async def _shutdown(loop: asyncio.AbstractEventLoop) -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks(loop) if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await loop.shutdown_asyncgens()
    await loop.shutdown_default_executor()
