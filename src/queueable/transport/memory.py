"""The in-memory transport: queued listeners without a broker, by the same rules as the real consumer.

Messages are kept as bytes and go through the very :class:`~queueable._consumer.Processor` the RabbitMQ consumer
uses (JSON round trip, validation, allow-list, container resolution, retry policy, dead-lettering). Two modes:

- **manual** (``queueable.testing``): nothing runs until the test calls :meth:`MemoryTransport.run_until_idle`;
  time is a :class:`ManualClock` the test advances, so "dead-lettered after 3 failures" takes no real seconds.
- **embedded** (``memory://``, ``autorun=True``): queued listeners run in the background right after
  ``dispatch()`` returns, with real delays between retries. Nothing survives the process: for development and
  single-process tools, not production.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from queueable import _wire
from queueable._consumer import (
    DeadLetter,
    Handled,
    Outcome,
    Processor,
    RetryLater,
    dead_letter_queue_for,
    replay_message,
)
from queueable.errors import PublishError, TransportClosedError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["ManualClock", "MemoryTransport", "Processed"]

log = logging.getLogger("queueable.memory")


class ManualClock:
    """A clock that moves only when told: ``clock.advance(30)``. Starts at a fixed, arbitrary epoch time."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self._now = start

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        if seconds < 0:
            msg = "time only moves forward"
            raise ValueError(msg)
        self._now += seconds

    def set(self, now: float) -> None:
        """Jump to ``now`` (never backwards)."""
        self.advance(max(now - self._now, 0.0))

    def __repr__(self) -> str:
        return f"<ManualClock now={_wire.iso_now(self._now)}>"


@dataclass(frozen=True, slots=True)
class Processed:
    """One delivery and its outcome, in the order they happened."""

    message: _wire.IncomingMessage
    outcome: Outcome
    at: float


@dataclass(order=True)
class _Delayed:
    due: float
    seq: int
    message: _wire.OutgoingMessage = field(compare=False)


class MemoryTransport:
    """A transport that keeps queues in memory and consumes them with the shared decision function.

    Bind it to a :class:`~queueable._consumer.Processor` (``App`` does this) before messages are run.
    """

    def __init__(
        self,
        processor: Processor | None = None,
        *,
        clock: Callable[[], float] | None = None,
        autorun: bool = False,
    ) -> None:
        self.clock: Callable[[], float] = clock or time.time
        self.autorun = autorun
        self.queues: dict[str, deque[_wire.OutgoingMessage]] = {}
        self.dead: dict[str, list[DeadLetter]] = {}
        self.history: list[Processed] = []
        self._delayed: list[_Delayed] = []
        self._seq = itertools.count()
        self._processor: Processor | None = None
        self._closed = False
        self._runner: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._declared: set[str] = set()
        if processor is not None:
            self.bind(processor)

    def bind(self, processor: Processor) -> None:
        """Consume with ``processor`` and declare its provider's queues (publishing elsewhere is unroutable)."""
        processor.clock = self.clock
        self._processor = processor
        for name in processor.provider.queue_names:
            self.declare(name)

    def declare(self, queue: str) -> None:
        """Create ``queue`` (and its dead-letter queue) if needed."""
        self._declared.add(queue)
        self.queues.setdefault(queue, deque())
        self.dead.setdefault(dead_letter_queue_for(queue), [])

    # -- Transport protocol ------------------------------------------------------------------------

    async def publish(self, messages: Sequence[_wire.OutgoingMessage]) -> None:
        """Enqueue every message, or none: an unknown queue is unroutable, as with ``mandatory`` on RabbitMQ."""
        if self._closed:
            raise TransportClosedError("the memory transport is closed")
        if self._processor is not None:
            # Late registrations (tests often register after the app is built) declare their queues too.
            for name in self._processor.provider.queue_names:
                if name not in self._declared:
                    self.declare(name)
        unroutable = [m for m in messages if m.queue not in self._declared]
        if unroutable:
            names = sorted({m.queue for m in unroutable})
            msg = f"unroutable: no queue named {', '.join(names)}"
            raise PublishError(msg, message_ids=[m.message_id for m in messages])  # none was enqueued
        for message in messages:
            self.queues[message.queue].append(message)
        self._wake()

    async def close(self) -> None:
        """Stop accepting messages; in embedded mode, let what is queued and due finish first."""
        if self._closed:
            return
        if self.autorun:
            await self.join()
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()

    # -- running -----------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages waiting in work queues (not counting delayed retries)."""
        return sum(len(q) for q in self.queues.values())

    @property
    def delayed(self) -> list[tuple[float, _wire.OutgoingMessage]]:
        """Retries waiting for their time, as ``(due, message)`` in due order."""
        return [(d.due, d.message) for d in sorted(self._delayed)]

    @property
    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, across all dead-letter queues, in the order they died."""
        return sorted(
            (d for letters in self.dead.values() for d in letters),
            key=lambda d: d.message.headers.get(_wire.H_DEAD_AT, ""),
        )

    async def run_once(self) -> Processed | None:
        """Process the next ready message, if any (due retries first return to their queue)."""
        processor = self._require_processor()
        self._release_due()
        for name, queue in self.queues.items():
            if queue:
                outgoing = queue.popleft()
                incoming = _to_incoming(outgoing, name)
                try:
                    outcome = await processor.process(incoming)
                except BaseException:
                    # Not decided (a bug, or the task cancelled): back to the front, as a worker's requeue.
                    queue.appendleft(outgoing)
                    raise
                self._apply(outcome)
                record = Processed(incoming, outcome, self.clock())
                self.history.append(record)
                return record
        return None

    async def run_until_idle(self, *, advance_time: bool = False, limit: int = 100_000) -> list[Processed]:
        """Process messages until none is ready; with ``advance_time`` (a :class:`ManualClock` only), jump the
        clock to each pending retry in turn until no retry is left. Returns what was processed.
        """
        done: list[Processed] = []
        while len(done) < limit:
            record = await self.run_once()
            if record is not None:
                done.append(record)
                continue
            if advance_time and self._delayed:
                clock = self.clock
                if not isinstance(clock, ManualClock):
                    msg = "advance_time needs a ManualClock"
                    raise TypeError(msg)
                clock.set(self._delayed[0].due)
                continue
            break
        return done

    async def join(self) -> None:
        """Embedded mode: wait until every queued message and retry has been processed."""
        while self.pending or self._delayed or (self._runner and not self._runner.done()):
            if self._runner is not None and not self._runner.done():
                await asyncio.shield(self._runner)
            elif self._delayed:
                await asyncio.sleep(max(self._delayed[0].due - self.clock(), 0.0))
                self._wake()
            else:
                self._wake()
                await asyncio.sleep(0)

    async def replay(self, dead_letter_queue: str | None = None) -> int:
        """Move dead letters back to their work queues (attempt reset, replay counted); returns how many."""
        moved = 0
        for name, letters in self.dead.items():
            if dead_letter_queue is not None and name != dead_letter_queue:
                continue
            while letters:
                letter = letters.pop(0)
                again = replay_message(_to_incoming(letter.message, name))
                self.declare(again.queue)
                self.queues[again.queue].append(again)
                moved += 1
        self._wake()
        return moved

    # -- internals ---------------------------------------------------------------------------------

    def _require_processor(self) -> Processor:
        if self._processor is None:
            msg = "the memory transport is not bound to a processor (use App, or MemoryTransport(processor))"
            raise RuntimeError(msg)
        return self._processor

    def _apply(self, outcome: Outcome) -> None:
        if isinstance(outcome, Handled):
            return
        if isinstance(outcome, RetryLater):
            due = self.clock() + outcome.delay
            heapq.heappush(self._delayed, _Delayed(due, next(self._seq), outcome.message))
            self._schedule()
            return
        self.dead.setdefault(outcome.message.queue, []).append(outcome)
        log.warning(
            "dead-lettered %s for %s: %s",
            outcome.message.message_id,
            outcome.message.headers.get(_wire.H_LISTENER),
            outcome.reason,
        )

    def _release_due(self) -> None:
        now = self.clock()
        while self._delayed and self._delayed[0].due <= now:
            item = heapq.heappop(self._delayed)
            self.queues.setdefault(item.message.queue, deque()).append(item.message)

    def _wake(self) -> None:
        if not self.autorun or self._closed:
            return
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run_background())

    def _schedule(self) -> None:
        if not self.autorun:
            return
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(max(self._delayed[0].due - self.clock(), 0.0), self._wake)

    async def _run_background(self) -> None:
        while await self.run_once() is not None:
            pass
        if self._delayed:  # the timer served the earliest retry; the next one needs its own
            self._schedule()

    def __repr__(self) -> str:
        mode = "embedded" if self.autorun else "manual"
        return (
            f"<MemoryTransport {mode} pending={self.pending} delayed={len(self._delayed)} "
            f"dead={sum(len(v) for v in self.dead.values())}>"
        )


def _to_incoming(message: _wire.OutgoingMessage, queue: str) -> _wire.IncomingMessage:
    return _wire.IncomingMessage(
        queue=queue,
        body=message.body,
        headers=dict(message.headers),
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        timestamp=message.timestamp,
        content_type=message.content_type,
        type=message.type,
    )
