"""An app whose queued listeners leave a durable trace, for tests that run ``queueable-consume`` as a process.

``queueable-consume apps.recorder:create_app`` (with ``integration/`` on ``PYTHONPATH``) builds it from the
environment: ``QUEUEABLE_URL``, ``QUEUEABLE_QUEUE`` and ``QUEUEABLE_EXCHANGE`` (unique per test), and
``QTEST_RECORD``, the file each listener appends a line to (``<kind> <event id> <pid> <unix time>``) with one
``write`` on an
``O_APPEND`` descriptor, so lines from several processes never interleave and a SIGKILL loses nothing that a
listener reported before it returned. The test process imports the same module and dispatches with
``create_app(url=..., default_queue=..., exchange=...)``, so both sides agree on listener ids and event names.

Listeners (all on the default queue, retried 3 times, 0.2 s then 0.4 s apart, no jitter):

- ``record_job(Job)``: records ``handled``.
- ``flaky(Flaky)``: records ``attempt``; raises until it has seen ``failures`` attempts, then records ``handled``.
  With ``retry_delay`` it raises ``queueable.Retry(delay=retry_delay)`` instead of ``RuntimeError``.
- ``doomed(Doomed)``: records ``attempt`` and always raises ``RuntimeError("doomed <id>")``.
- ``slow_sync(SlowSync)``: the same as ``slow`` in a plain (sync) function, so it runs in a worker thread.
- ``crash(Crash)``: records ``attempt`` and SIGKILLs its own process (a message that kills every worker).
- ``slow(Slow)``: records ``started``, sleeps ``seconds`` (``then_seconds`` when this id has started before, if
  set), records ``handled``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from queueable import App, Retry, RetryPolicy, Settings, event

RECORD_ENV = "QTEST_RECORD"
DELIVERY_LIMIT_ENV = "QTEST_DELIVERY_LIMIT"
RETRY = RetryPolicy(max_attempts=3, initial_delay=0.2, multiplier=2.0, max_delay=1.0, jitter=0.0)


@event("qtest.job")
class Job(BaseModel):
    id: str


@event("qtest.flaky")
class Flaky(BaseModel):
    id: str
    failures: int = 2
    retry_delay: float | None = None


@event("qtest.doomed")
class Doomed(BaseModel):
    id: str


@event("qtest.crash")
class Crash(BaseModel):
    id: str


@event("qtest.slow")
class Slow(BaseModel):
    id: str
    seconds: float
    then_seconds: float | None = None


@event("qtest.slow_sync")
class SlowSync(BaseModel):
    id: str
    seconds: float
    then_seconds: float | None = None


def record(kind: str, event_id: str) -> None:
    """Append ``<kind> <event_id> <pid> <time>`` to the file named by ``QTEST_RECORD`` (one atomic write)."""
    path = os.environ[RECORD_ENV]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {event_id} {os.getpid()} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Line:
    """One recorded line."""

    kind: str
    id: str
    pid: int
    at: float


def read_records(path: Path) -> list[Line]:
    """Every complete line recorded so far."""
    if not path.exists():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        kind, event_id, pid, at = raw.split(" ")
        lines.append(Line(kind, event_id, int(pid), float(at)))
    return lines


def handled_counts(path: Path) -> Counter[str]:
    """How many times each event id was handled."""
    return Counter(line.id for line in read_records(path) if line.kind == "handled")


def count_of(kind: str, event_id: str) -> int:
    """How many ``kind`` lines were recorded for ``event_id`` (by any process)."""
    path = Path(os.environ[RECORD_ENV])
    return sum(1 for line in read_records(path) if line.kind == kind and line.id == event_id)


async def record_job(event: Job) -> None:
    record("handled", event.id)


async def flaky(event: Flaky) -> None:
    record("attempt", event.id)
    if count_of("attempt", event.id) <= event.failures:
        msg = f"flaky {event.id} fails"
        if event.retry_delay is not None:
            raise Retry(msg, delay=event.retry_delay)
        raise RuntimeError(msg)
    record("handled", event.id)


async def doomed(event: Doomed) -> None:
    record("attempt", event.id)
    msg = f"doomed {event.id}"
    raise RuntimeError(msg)


async def crash(event: Crash) -> None:
    record("attempt", event.id)
    os.kill(os.getpid(), signal.SIGKILL)


async def slow(event: Slow) -> None:
    record("started", event.id)
    again = event.then_seconds is not None and count_of("started", event.id) > 1
    await asyncio.sleep(event.then_seconds if again and event.then_seconds is not None else event.seconds)
    record("handled", event.id)


def slow_sync(event: SlowSync) -> None:
    record("started", event.id)
    again = event.then_seconds is not None and count_of("started", event.id) > 1
    time.sleep(event.then_seconds if again and event.then_seconds is not None else event.seconds)
    record("handled", event.id)


def create_app(**overrides: Any) -> App:
    """The app, with settings from ``QUEUEABLE_*`` and ``overrides`` (the test process passes its own).

    ``QTEST_DELIVERY_LIMIT`` sets the work queue's delivery limit (the producer passes the same override).
    """
    if os.environ.get(DELIVERY_LIMIT_ENV):
        overrides.setdefault("delivery_limit", int(os.environ[DELIVERY_LIMIT_ENV]))
    app = App(settings=Settings.from_env(**overrides), default_retry=RETRY)
    for func in (record_job, flaky, doomed, crash, slow, slow_sync):
        app.add_listener(func, queue=True)
    return app
