"""The worker's order of operations with a scripted transport: nothing is acked before its outcome is durable."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel

from queueable import App, PublishError, RetryPolicy, Settings, event
from queueable._dispatcher import build_messages
from queueable._wire import IncomingMessage, OutgoingMessage
from queueable._worker import REQUEUE_PAUSE, StopReason, Worker, WorkerOptions, current_rss_mb

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


@event("tests.worker.job")
class Job(BaseModel):
    id: str
    fail: bool = False
    seconds: float = 0.0


class ScriptedTransport:
    """Records every call in order; publishes fail while ``fail_publish`` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.deliver: Callable[[IncomingMessage, Any], None] | None = None
        self.fail_publish = False
        self.held = True
        self.consuming = asyncio.Event()

    async def connect(self) -> None:
        self.calls.append(("connect", None))

    async def declare_topology(self, queues: Sequence[str] | None = None) -> None:
        self.calls.append(("declare", tuple(queues or ())))

    async def start_consuming(self, queues: Sequence[str], *, prefetch: int, deliver: Any) -> None:
        self.deliver = deliver
        self.calls.append(("consume", prefetch))
        self.consuming.set()

    async def stop_consuming(self) -> None:
        self.calls.append(("cancel", None))

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        await self._publish("publish", messages[0])

    async def publish_retry(self, message: OutgoingMessage, delay: float) -> None:
        await self._publish("retry", message)

    async def _publish(self, kind: str, message: OutgoingMessage) -> None:
        await asyncio.sleep(0)
        if self.fail_publish:
            self.calls.append((kind + "-failed", message.queue))
            msg = "not confirmed"
            raise PublishError(msg, message_ids=[message.message_id])
        self.calls.append((kind, message.queue))

    def is_held(self, token: Any) -> bool:
        return self.held

    async def ack(self, token: Any) -> None:
        self.calls.append(("ack", token))

    async def nack(self, token: Any, *, requeue: bool = True) -> None:
        self.calls.append(("nack", token))

    async def close(self) -> None:
        self.calls.append(("close", None))

    def settled(self) -> list[tuple[str, Any]]:
        return [
            c for c in self.calls if c[0] in {"ack", "nack", "publish", "retry", "publish-failed", "retry-failed"}
        ]


@pytest.fixture(name="app")
def fixture_app() -> App:
    app = App(settings=Settings(url="amqp://guest:guest@localhost/"))
    seen: list[str] = []

    async def job(event: Job) -> None:
        seen.append(event.id)
        if event.seconds:
            await asyncio.sleep(event.seconds)
        if event.fail:
            msg = f"job {event.id} failed"
            raise RuntimeError(msg)

    app.add_listener(job, queue=True, id="tests:job", retry=RetryPolicy(max_attempts=2, jitter=0.0))
    app.seen = seen  # type: ignore[attr-defined]
    return app


def incoming(job: Job, **header_overrides: Any) -> IncomingMessage:
    [out] = _messages(job)
    headers = {**out.headers, **header_overrides}
    return IncomingMessage(queue=out.queue, body=out.body, headers=headers, message_id=out.message_id)


def _messages(job: Job) -> list[OutgoingMessage]:
    from queueable._provider import ListenerProvider  # noqa: PLC0415

    provider = ListenerProvider()

    async def job_listener(event: Job) -> None: ...

    entry = provider.add_listener(job_listener, queue=True, id="tests:job")
    return build_messages(job, [entry])


async def run_with(
    app: App, transport: ScriptedTransport, **options: Any
) -> tuple[Worker, asyncio.Task[StopReason]]:
    worker = Worker(app.processor(), transport, WorkerOptions(queues=("queueable",), **options))
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(transport.consuming.wait(), 2)
    return worker, task


async def settle(transport: ScriptedTransport, count: int) -> None:
    for _ in range(200):
        if len([c for c in transport.calls if c[0] in {"ack", "nack"}]) >= count:
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"fewer than {count} acks/nacks: {transport.calls}")


async def test_handled_is_acked(app):
    """A successful listener's message is acked, with nothing published."""
    transport = ScriptedTransport()
    worker, task = await run_with(app, transport)
    assert transport.deliver is not None
    transport.deliver(incoming(Job(id="a")), "t1")
    await settle(transport, 1)
    worker.stop()
    assert await task == StopReason.REQUESTED
    assert transport.settled() == [("ack", "t1")]
    assert transport.calls[-1] == ("close", None)


async def test_retry_copy_is_published_before_the_ack(app):
    """A failure publishes the retry copy first, and acks only after it."""
    transport = ScriptedTransport()
    worker, task = await run_with(app, transport)
    assert transport.deliver is not None
    transport.deliver(incoming(Job(id="b", fail=True)), "t1")
    await settle(transport, 1)
    worker.stop()
    await task
    assert transport.settled() == [("retry", "queueable"), ("ack", "t1")]
    assert worker.stats.retried == 1


async def test_dead_letter_copy_is_published_before_the_ack(app):
    """Bad input publishes the dead letter to Q.dead first, then acks."""
    transport = ScriptedTransport()
    worker, task = await run_with(app, transport)
    assert transport.deliver is not None
    transport.deliver(incoming(Job(id="c"), **{"x-queueable-listener": "nobody:here"}), "t1")
    await settle(transport, 1)
    worker.stop()
    await task
    assert transport.settled() == [("publish", "queueable.dead"), ("ack", "t1")]
    assert worker.stats.dead_lettered == 1


async def test_failed_outcome_publish_nacks_the_original(app):
    """When the copy is not confirmed, the original is nacked (requeued), never acked."""
    transport = ScriptedTransport()
    transport.fail_publish = True
    worker, task = await run_with(app, transport)
    assert transport.deliver is not None
    transport.deliver(incoming(Job(id="d", fail=True)), "t1")
    transport.deliver(incoming(Job(id="e"), **{"x-queueable-listener": "nobody:here"}), "t2")
    await settle(transport, 2)
    worker.stop()
    await task
    assert ("ack", "t1") not in transport.calls
    assert ("ack", "t2") not in transport.calls
    assert ("nack", "t1") in transport.calls
    assert ("nack", "t2") in transport.calls
    assert worker.stats.failed_outcomes == 2


async def test_lost_delivery_publishes_nothing(app):
    """When the delivery's channel died while its listener ran, no copy is published (the broker redelivers
    the original).
    """
    transport = ScriptedTransport()
    worker, task = await run_with(app, transport)
    assert transport.deliver is not None
    transport.deliver(incoming(Job(id="f", fail=True, seconds=0.05)), "t1")
    await asyncio.sleep(0.02)  # the listener is running
    transport.held = False
    await asyncio.sleep(0.1)
    worker.stop()
    await task
    assert app.seen == ["f"]  # type: ignore[attr-defined]
    assert transport.settled() == []


async def test_a_delivery_whose_channel_closed_before_it_ran_is_not_run(app):
    """The broker requeued it with its channel: running it too would run the listener twice."""
    transport = ScriptedTransport()
    transport.held = False
    worker, task = await run_with(app, transport)
    assert transport.deliver is not None
    transport.deliver(incoming(Job(id="stale")), "t1")
    await asyncio.sleep(0.05)
    worker.stop()
    await task
    assert app.seen == []  # type: ignore[attr-defined]
    assert transport.settled() == []


async def test_buffered_messages_are_requeued_at_stop(app):
    """Deliveries not started when the worker stops are nacked (requeued), not processed."""
    transport = ScriptedTransport()
    worker, task = await run_with(app, transport, concurrency=1)
    assert transport.deliver is not None
    transport.deliver(incoming(Job(id="slow", seconds=0.1)), "t1")
    await asyncio.sleep(0.01)
    transport.deliver(incoming(Job(id="waiting")), "t2")
    worker.stop()
    await task
    assert ("ack", "t1") in transport.calls
    assert ("nack", "t2") in transport.calls
    assert app.seen == ["slow"]
    assert transport.calls.index(("cancel", None)) < transport.calls.index(("nack", "t2"))


async def test_shutdown_timeout_cancels_and_requeues(app):
    """A handler still running after the shutdown timeout is cancelled and its message requeued."""
    transport = ScriptedTransport()
    worker, task = await run_with(app, transport, shutdown_timeout=0.05)
    assert transport.deliver is not None
    transport.deliver(incoming(Job(id="stuck", seconds=10)), "t1")
    await asyncio.sleep(0.01)
    worker.stop()
    await asyncio.wait_for(task, 2)
    assert transport.settled() == [("nack", "t1")]
    assert worker.abandoned == 1


async def test_second_stop_skips_the_wait(app):
    """A second stop request requeues running messages at once."""
    transport = ScriptedTransport()
    worker, task = await run_with(app, transport, shutdown_timeout=30)
    assert transport.deliver is not None
    transport.deliver(incoming(Job(id="stuck", seconds=10)), "t1")
    await asyncio.sleep(0.01)
    worker.stop(StopReason.SIGNAL)
    await asyncio.sleep(0.01)
    worker.stop(StopReason.SIGNAL)
    assert await asyncio.wait_for(task, 2) == StopReason.SIGNAL
    assert transport.settled() == [("nack", "t1")]


async def test_max_messages(app):
    """The worker takes exactly max_messages messages, then requeues the rest and stops."""
    transport = ScriptedTransport()
    _worker, task = await run_with(app, transport, max_messages=2, concurrency=1)
    assert transport.deliver is not None
    for i in range(4):
        transport.deliver(incoming(Job(id=f"m{i}")), f"t{i}")
    assert await asyncio.wait_for(task, 2) == StopReason.MAX_MESSAGES
    assert app.seen == ["m0", "m1"]
    assert [c for c in transport.calls if c[0] == "ack"] == [("ack", "t0"), ("ack", "t1")]
    assert {c[1] for c in transport.calls if c[0] == "nack"} == {"t2", "t3"}


async def test_memory_limit_stops_the_worker(app):
    """Above the memory limit (checked between messages) the worker stops with MEMORY_LIMIT."""
    transport = ScriptedTransport()
    _worker, task = await run_with(app, transport, memory_limit_mb=1)
    assert transport.deliver is not None
    transport.deliver(incoming(Job(id="m")), "t1")
    assert await asyncio.wait_for(task, 2) == StopReason.MEMORY_LIMIT
    assert transport.settled() == [("ack", "t1")]


def test_current_rss_is_plausible():
    """The resident memory reading is a positive number of megabytes."""
    rss = current_rss_mb()
    assert rss is not None
    assert 1 < rss < 100_000


def test_worker_needs_a_queue(app):
    """A worker without queues is a programming error."""
    with pytest.raises(ValueError, match="queue"):
        Worker(app.processor(), ScriptedTransport(), WorkerOptions(queues=()))


async def test_failed_outcome_waits_before_requeueing(app):
    """A copy that cannot be published is requeued after a pause, so a lasting cause does not spin."""
    transport = ScriptedTransport()
    transport.fail_publish = True
    worker, task = await run_with(app, transport)
    assert transport.deliver is not None
    started = asyncio.get_running_loop().time()
    transport.deliver(incoming(Job(id="g", fail=True)), "t1")
    await settle(transport, 1)
    assert asyncio.get_running_loop().time() - started >= REQUEUE_PAUSE * 0.9
    worker.stop()
    await task
    assert transport.settled() == [("retry-failed", "queueable"), ("nack", "t1")]


async def test_a_listeners_own_cancelled_error_is_a_failure_not_the_end_of_the_worker():
    """A listener that meets a cancellation from elsewhere (an awaited future someone cancelled) fails like any
    listener: its message is retried, and the worker's tasks keep running the next ones.
    """
    app = App(settings=Settings(url="amqp://guest:guest@localhost/"))
    seen: list[str] = []

    async def job(event: Job) -> None:
        seen.append(event.id)
        if event.fail:
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future  # raises CancelledError in this task, which nobody cancelled

    app.add_listener(job, queue=True, id="tests:job", retry=RetryPolicy(max_attempts=2, jitter=0.0))
    transport = ScriptedTransport()
    worker, task = await run_with(app, transport, concurrency=1)
    assert transport.deliver is not None
    transport.deliver(incoming(Job(id="bad", fail=True)), "t1")
    await settle(transport, 1)
    transport.deliver(incoming(Job(id="good")), "t2")
    await settle(transport, 2)
    worker.stop()
    await asyncio.wait_for(task, 2)
    assert seen == ["bad", "good"]
    assert transport.settled() == [("retry", "queueable"), ("ack", "t1"), ("ack", "t2")]
