"""The consume loop of ``queueable-consume``: deliveries in, shared decision, durable outcome, then ack.

Transport-agnostic: it drives any :class:`ConsumerTransport` (the RabbitMQ transport is the one that exists),
and every decision about a message is :meth:`queueable.Processor.process`'s, never this module's. What this
module adds is the order of operations that makes an outcome durable before the original goes away::

    Handled     -> ack
    RetryLater  -> publish the copy to its delay queue, confirmed -> ack
    DeadLetter  -> publish the copy to Q.dead, confirmed           -> ack
    publish failed (broker refused, timeout, connection lost)      -> nack(requeue=True)

No path acks a message whose outcome is not durable. A delivery whose channel died meanwhile is left alone:
the broker has requeued it already, and publishing its copy would only make a duplicate.

Concurrency: the transport pushes deliveries (at most ``prefetch`` unacked) into a local buffer; ``concurrency``
tasks take them one at a time. Sync listeners run in worker threads (``call_listener``), so the loop keeps
acking while they run. Nothing is logged per successful message above DEBUG. The RabbitMQ transport batches
acks (``AckCoalescer``): a settled delivery's ack is written when a quarter of the prefetch is waiting or 5 ms
after the first one waited, as one ``multiple`` ack over a contiguous run of settled tags where that is exact.
Only durable outcomes are ever acked; the delay only widens what a crash may redeliver (at least once), and
``close()`` writes every waiting ack first.

A handler must finish well within RabbitMQ's ``consumer_timeout`` (30 min by default, checked about once a
minute): past it the broker closes the channel and redelivers the message while the handler still runs. Use
``Listener.timeout`` (``@listener(timeout=...)``) for anything that might hang.

Shutdown (SIGTERM/SIGINT, ``--max-messages``, ``--time-limit``, ``--memory-limit``): cancel the consumers, requeue
what is buffered but not started, give running handlers ``shutdown_timeout`` seconds, then cancel them and
requeue their messages, close, return.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from queueable import _wire
from queueable._consumer import DeadLetter, Handled, RetryLater, slimmed
from queueable.errors import MessageTooLargeError, QueueableError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from queueable._consumer import Processor

__all__ = ["ConsumerTransport", "StopReason", "Worker", "WorkerOptions", "WorkerStats", "current_rss_mb"]

log = logging.getLogger("queueable.worker")

_MEMORY_CHECK_INTERVAL = 1.0  # seconds between two RSS readings
#: Pause before requeueing a message whose outcome could not be made durable (or whose processing broke), so
#: that a persistent cause (a deleted dead-letter queue, say) does not turn into a hot redelivery loop.
REQUEUE_PAUSE = 0.5


class ConsumerTransport(Protocol):
    """What the worker needs from a transport (``RabbitMQTransport`` implements it)."""

    async def connect(self) -> None: ...

    async def declare_topology(self, queues: Sequence[str] | None = None) -> Any: ...

    async def start_consuming(
        self, queues: Sequence[str], *, prefetch: int, deliver: Callable[[_wire.IncomingMessage, Any], None]
    ) -> None: ...

    async def stop_consuming(self) -> None: ...

    async def publish(self, messages: Sequence[_wire.OutgoingMessage]) -> None: ...

    async def publish_retry(self, message: _wire.OutgoingMessage, delay: float) -> None: ...

    def is_held(self, token: Any) -> bool: ...

    async def ack(self, token: Any) -> None: ...

    async def nack(self, token: Any, *, requeue: bool = True) -> None: ...

    async def close(self) -> None: ...


class StopReason(enum.StrEnum):
    """Why the worker stopped (all are clean exits)."""

    SIGNAL = "signal"
    MAX_MESSAGES = "max_messages"
    TIME_LIMIT = "time_limit"
    MEMORY_LIMIT = "memory_limit"
    REQUESTED = "requested"


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How the worker consumes; the CLI options of ``queueable-consume``."""

    queues: tuple[str, ...]
    prefetch: int = 64
    concurrency: int = 16
    max_messages: int | None = None
    time_limit: float | None = None
    memory_limit_mb: int | None = None
    shutdown_timeout: float = 30.0


@dataclass(slots=True)
class WorkerStats:
    """Counters, reported at shutdown (and readable while running)."""

    handled: int = 0
    retried: int = 0
    dead_lettered: int = 0
    requeued: int = 0
    failed_outcomes: int = 0  # outcome copies the broker did not confirm (originals requeued)
    started_at: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        """For the shutdown log line."""
        return {
            "handled": self.handled,
            "retried": self.retried,
            "dead_lettered": self.dead_lettered,
            "requeued": self.requeued,
            "failed_outcomes": self.failed_outcomes,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
        }


class Worker:
    """Consumes ``options.queues`` through ``transport`` and runs every delivery through ``processor``."""

    def __init__(self, processor: Processor, transport: ConsumerTransport, options: WorkerOptions) -> None:
        if not options.queues:
            msg = "the worker needs at least one queue"
            raise ValueError(msg)
        self.processor = processor
        self.transport = transport
        self.options = options
        self.stats = WorkerStats()
        self.stop_reason: StopReason | None = None
        self._buffer: asyncio.Queue[tuple[_wire.IncomingMessage, Any]] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._stopping = False
        self._taken = 0
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._next_memory_check = 0.0
        self._force = False
        #: Handlers still running when the shutdown timeout ran out (cancelled; sync ones keep their thread).
        self.abandoned = 0

    # -- control -----------------------------------------------------------------------------------

    def stop(self, reason: StopReason = StopReason.REQUESTED) -> None:
        """Ask the worker to shut down gracefully (safe to call from a signal handler on the loop).

        A second call while already stopping makes the shutdown immediate: running handlers are cancelled
        and their messages requeued without waiting for ``shutdown_timeout``.
        """
        if self._stop.is_set():
            if not self._force:
                self._force = True
                log.warning("second stop request: requeueing running messages now")
                self._idle.set()  # stop waiting for running handlers
            return
        self.stop_reason = reason
        self._stop.set()

    async def run(self) -> StopReason:
        """Connect, declare, consume until stopped, shut down cleanly; returns why it stopped."""
        options = self.options
        await self.transport.connect()
        await self.transport.declare_topology(list(options.queues))
        loop = asyncio.get_running_loop()
        workers = [
            loop.create_task(self._work(), name=f"queueable-worker-{i}") for i in range(options.concurrency)
        ]
        timer = None
        if options.time_limit is not None:
            timer = loop.call_later(options.time_limit, self.stop, StopReason.TIME_LIMIT)
        try:
            await self.transport.start_consuming(
                list(options.queues), prefetch=max(options.prefetch, 1), deliver=self._deliver
            )
            log.info(
                "consuming %s (prefetch=%d, concurrency=%d)",
                ", ".join(options.queues),
                options.prefetch,
                options.concurrency,
            )
            await self._stop.wait()
            log.info("stopping (%s): no new deliveries; waiting for running handlers", self.stop_reason)
        finally:
            if timer is not None:
                timer.cancel()
            self._stopping = True
            await self._shutdown(workers)
        assert self.stop_reason is not None
        log.info("stopped (%s): %s", self.stop_reason, self.stats.as_dict(), extra={"stats": self.stats.as_dict()})
        return self.stop_reason

    # -- internals ---------------------------------------------------------------------------------

    def _deliver(self, incoming: _wire.IncomingMessage, token: Any) -> None:
        self._buffer.put_nowait((incoming, token))

    async def _shutdown(self, workers: list[asyncio.Task[None]]) -> None:
        with contextlib.suppress(Exception):
            await self.transport.stop_consuming()
        await self._requeue_buffered()
        if self._busy and not self._force:
            try:
                async with asyncio.timeout(self.options.shutdown_timeout):
                    await self._idle.wait()
            except TimeoutError:
                self.abandoned = self._busy
                log.warning(
                    "%d handler(s) still running after %g s: cancelling them and requeueing their messages",
                    self._busy,
                    self.options.shutdown_timeout,
                )
        if self._force:
            self.abandoned = self._busy
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await self._requeue_buffered()
        await self.transport.close()

    async def _requeue_buffered(self) -> None:
        while not self._buffer.empty():
            _, token = self._buffer.get_nowait()
            await self._settle(token, ack=False)

    async def _work(self) -> None:
        buffer = self._buffer
        process = self.processor.process
        max_messages = self.options.max_messages
        memory_limit = self.options.memory_limit_mb
        loop = asyncio.get_running_loop()
        while True:
            incoming, token = await buffer.get()
            if not await self._admit(incoming, token):
                continue
            self._taken += 1
            if max_messages is not None and self._taken >= max_messages:
                self.stop(StopReason.MAX_MESSAGES)
            self._busy += 1
            self._idle.clear()
            deciding = True
            try:
                outcome = await process(incoming)
                deciding = False  # from here on _apply settles the delivery, exactly once
                await self._apply(outcome, incoming, token)
            except asyncio.CancelledError:
                # Cancelled by the shutdown timeout: requeue now. If _apply had started (an ack may already be
                # on the wire), leave it: whatever is not acked is requeued when the connection closes.
                if deciding:
                    await self._settle(token, ack=False)
                raise
            except Exception:
                # Processor.process turns listener errors into outcomes; this is a bug or a broken transport.
                log.exception("unexpected error processing message %s; requeueing it", incoming.message_id)
                await self._pause_before_requeue()
                await self._settle(token, ack=False)
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()
            if memory_limit is not None and loop.time() >= self._next_memory_check:
                self._next_memory_check = loop.time() + _MEMORY_CHECK_INTERVAL
                rss = current_rss_mb()
                if rss is not None and rss > memory_limit:
                    log.warning("memory limit reached: %.0f MB > %d MB", rss, memory_limit)
                    self.stop(StopReason.MEMORY_LIMIT)

    async def _admit(self, incoming: _wire.IncomingMessage, token: Any) -> bool:
        """Whether a buffered delivery may run now; if not, it goes back to the broker (or already went)."""
        max_messages = self.options.max_messages
        # _stop, not only _stopping: a limit hit by a worker task sets _stop, and the next buffered delivery
        # can arrive before run() wakes up to set _stopping; it must go back, not be handled past the limit.
        if self._stopping or self._stop.is_set() or (max_messages is not None and self._taken >= max_messages):
            await self._settle(token, ack=False)
            return False
        if not self.transport.is_held(token):
            # Its channel closed while it waited here (a connection drop, a consumer set-up attempt that failed):
            # the broker requeued it, and it comes again. Running it now would run it twice.
            log.debug("message %s: its channel closed before it ran; it comes again", incoming.message_id)
            return False
        return True

    async def _apply(
        self, outcome: Handled | RetryLater | DeadLetter, incoming: _wire.IncomingMessage, token: Any
    ) -> None:
        if isinstance(outcome, Handled):
            self.stats.handled += 1
            await self._settle(token, ack=True)
            return
        transport = self.transport
        if not transport.is_held(token):
            # The channel died while the listener ran: the broker requeued the message already.
            log.warning("message %s: delivery lost with its channel; it will be redelivered", incoming.message_id)
            return
        try:
            outcome = await self._publish_copy(outcome, incoming)
        except (QueueableError, OSError) as exc:
            self.stats.failed_outcomes += 1
            kind = "retry" if isinstance(outcome, RetryLater) else "dead letter"
            log.error(  # noqa: TRY400 - the exception text is the point; its traceback is noise here
                "message %s: could not publish its %s copy (%s); requeueing the original",
                incoming.message_id,
                kind,
                exc,
            )
            await self._pause_before_requeue()
            await self._settle(token, ack=False)
            return
        if isinstance(outcome, RetryLater):
            self.stats.retried += 1
            log.info(
                "message %s for %s failed (%s); retry in %.3g s",
                incoming.message_id,
                incoming.headers.get(_wire.H_LISTENER),
                outcome.error,
                outcome.delay,
                extra=_fields(incoming, delay=outcome.delay, attempt=outcome.message.headers.get(_wire.H_ATTEMPT)),
            )
        else:
            self.stats.dead_lettered += 1
            log.warning(
                "message %s for %s dead-lettered to %s (%s): %s",
                incoming.message_id,
                incoming.headers.get(_wire.H_LISTENER),
                outcome.message.queue,
                outcome.reason,
                outcome.error,
                extra=_fields(incoming, reason=str(outcome.reason), dead_letter_queue=outcome.message.queue),
            )
        await self._settle(token, ack=True)

    async def _publish_copy(
        self, outcome: RetryLater | DeadLetter, incoming: _wire.IncomingMessage
    ) -> RetryLater | DeadLetter:
        """Publish the retry or dead-letter copy; returns the outcome whose copy went out.

        A copy too large for one frame (incoming headers close to the broker's ``frame_max``, plus the error
        headers this worker adds) goes again without its traceback and with a short error message; if even that
        does not fit, as a dead letter without the producer's own headers (:meth:`Processor.oversized`), so that
        the message is not requeued for ever.
        """
        try:
            await self._publish_outcome(outcome)
        except MessageTooLargeError as exc:
            kind = "retry" if isinstance(outcome, RetryLater) else "dead letter"
            slim = slimmed(outcome)
            if slim is not None:
                log.warning(
                    "message %s: its %s copy is too large (%s); sending it without the traceback",
                    outcome.message.message_id,
                    kind,
                    exc,
                )
                try:
                    await self._publish_outcome(slim)
                except MessageTooLargeError:
                    pass
                else:
                    return slim
            bare = self.processor.oversized(incoming, outcome)
            log.warning(
                "message %s: its %s copy does not fit in one frame even without the traceback; dead-lettering it "
                "without its producer's headers (%s)",
                outcome.message.message_id,
                kind,
                bare.message.headers.get(_wire.H_DROPPED_HEADERS),
            )
            await self._publish_outcome(bare)
            return bare
        return outcome

    async def _publish_outcome(self, outcome: RetryLater | DeadLetter) -> None:
        if isinstance(outcome, RetryLater):
            await self.transport.publish_retry(outcome.message, outcome.delay)
        else:
            await self.transport.publish((outcome.message,))

    async def _pause_before_requeue(self) -> None:
        if not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REQUEUE_PAUSE):
                    await self._stop.wait()

    async def _settle(self, token: Any, *, ack: bool) -> None:
        try:
            if ack:
                await self.transport.ack(token)
            else:
                await self.transport.nack(token, requeue=True)
                self.stats.requeued += 1
        except Exception as exc:  # the channel is gone; the broker redelivers the message
            log.warning(
                "could not %s a delivery (%s); the broker will redeliver it", "ack" if ack else "nack", exc
            )


def _fields(incoming: _wire.IncomingMessage, **more: Any) -> dict[str, Any]:
    """Structured fields for ``--log-format json`` (failure paths only; never per successful message)."""
    return {
        "message_id": incoming.message_id,
        "correlation_id": incoming.correlation_id,
        "queue": incoming.queue,
        "listener": incoming.headers.get(_wire.H_LISTENER),
        "event": incoming.headers.get(_wire.H_EVENT),
        **more,
    }


def current_rss_mb() -> float | None:
    """This process's resident memory in MB (Linux: /proc; elsewhere: the peak, from getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as statm:  # noqa: PTH123 - a hot, tiny read
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1_048_576
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource  # noqa: PLC0415 - not on Windows
    except ImportError:  # pragma: no cover
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1_048_576 if sys.platform == "darwin" else peak / 1024
