"""The worker (``queueable._worker``) in-process against the real broker: ack, retry, dead letters, bad input.

The process-level behaviour (signals, exit codes, SIGKILL, broker restarts) is in ``test_process_*.py``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

import aio_pika
import pytest
from pydantic import BaseModel

from queueable import App, MessageTooLargeError, OutgoingMessage, PublishError, RetryPolicy, Settings, event
from queueable._wire import (
    H_ATTEMPT,
    H_CONSUMER_HOST,
    H_CONSUMER_PID,
    H_DEAD_REASON,
    H_ERROR_MESSAGE,
    H_ERROR_TRACEBACK,
    H_ERROR_TYPE,
    H_EVENT,
    H_FIRST_FAILURE,
    H_LAST_FAILURE,
    H_LISTENER,
    H_ORIGINAL_QUEUE,
)
from queueable._worker import StopReason, Worker, WorkerOptions
from queueable.transport.rabbitmq import RabbitMQTransport, _Shortcut, dead_reason_of

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

MAX_BODY = 1000


@event("qtest.consumer.ping")
class Ping(BaseModel):
    id: str


@event("qtest.consumer.fail")
class Fail(BaseModel):
    id: str
    failures: int = 1000


@event("qtest.consumer.slow")
class Slow(BaseModel):
    id: str
    seconds: float


class World:
    """One test's app, worker and broker names; records what listeners saw."""

    def __init__(self, amqp_url: str, unique: str, **settings: Any) -> None:
        self.unique = unique
        self.settings = Settings(
            url=amqp_url,
            exchange=unique,
            default_queue=unique,
            **{"publish_timeout": 5.0, "max_body_size": MAX_BODY, **settings},
        )
        self.app = App(settings=self.settings)
        self.seen: list[tuple[str, str, float]] = []  # (kind, id, when)
        self.worker: Worker | None = None
        self.task: asyncio.Task[StopReason] | None = None
        retry = RetryPolicy(max_attempts=3, initial_delay=0.3, multiplier=1.0, max_delay=0.3, jitter=0.0)

        async def ping(event: Ping) -> None:
            self.seen.append(("handled", event.id, time.monotonic()))

        async def fail(event: Fail) -> None:
            attempts = sum(1 for kind, i, _ in self.seen if kind == "attempt" and i == event.id) + 1
            self.seen.append(("attempt", event.id, time.monotonic()))
            if attempts <= event.failures:
                msg = f"fail {event.id} attempt {attempts}"
                raise RuntimeError(msg)
            self.seen.append(("handled", event.id, time.monotonic()))

        async def slow(event: Slow) -> None:
            self.seen.append(("started", event.id, time.monotonic()))
            await asyncio.sleep(event.seconds)
            self.seen.append(("handled", event.id, time.monotonic()))

        self.app.add_listener(ping, queue=True, id="tests:ping")
        self.app.add_listener(fail, queue=True, id="tests:fail", retry=retry)
        self.app.add_listener(slow, queue=True, id="tests:slow")

    def start(self, **options: Any) -> Worker:
        """Run a worker on the app's queues in the background."""
        transport = RabbitMQTransport(self.settings, queues=self.app.provider.queue_names)
        options.setdefault("shutdown_timeout", 5.0)
        options.setdefault("concurrency", 4)
        worker = Worker(
            self.app.processor(), transport, WorkerOptions(queues=tuple(self.app.provider.queue_names), **options)
        )
        self.worker = worker
        self.task = asyncio.create_task(worker.run())
        return worker

    async def stop(self) -> StopReason:
        """Stop the worker gracefully and return why it stopped."""
        assert self.worker is not None
        assert self.task is not None
        self.worker.stop()
        return await asyncio.wait_for(self.task, 15)

    def count(self, kind: str, event_id: str) -> int:
        """How often the listeners recorded ``kind`` for ``event_id``."""
        return sum(1 for k, i, _ in self.seen if k == kind and i == event_id)


@pytest.fixture(name="world")
async def fixture_world(amqp_url: str, unique: str, admin: Any) -> AsyncIterator[World]:
    """A started in-process worker on this test's queue, stopped afterwards (in this module it replaces
    conftest's process-level ``world``).
    """
    world = World(amqp_url, unique)
    world.start()
    await wait_for(lambda: world.worker is not None and bool(world.worker.transport._consumers))  # type: ignore[attr-defined]
    yield world
    if world.task is not None and not world.task.done():
        await world.stop()
    await world.app.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 8.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


async def dead_letters(
    admin: aio_pika.abc.AbstractConnection, queue: str, n: int = 1, timeout: float = 8.0
) -> list:
    """Wait until ``n`` messages are in ``queue``.dead and take them."""
    channel = await admin.channel()
    dead = await channel.declare_queue(queue + ".dead", passive=True)
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        incoming = await dead.get(fail=False, no_ack=True)
        if incoming is None:
            if time.monotonic() > deadline:
                pytest.fail(f"{len(got)} of {n} dead letters within {timeout} s")
            await asyncio.sleep(0.05)
        else:
            got.append(incoming)
    await channel.close()
    return got


async def queue_depth(admin: aio_pika.abc.AbstractConnection, queue: str) -> int:
    """Ready messages in ``queue``."""
    channel = await admin.channel()
    declared = await channel.declare_queue(queue, passive=True)
    await channel.close()
    count = declared.declaration_result.message_count
    assert count is not None
    return count


async def publish_raw(
    admin: aio_pika.abc.AbstractConnection, exchange: str, routing_key: str, body: bytes, **properties: Any
) -> str:
    """Publish a hand-made message (confirmed) and return its message id."""
    channel = await admin.channel(publisher_confirms=True)
    properties.setdefault("message_id", uuid.uuid4().hex)
    properties.setdefault("content_type", "application/json")
    target = await channel.get_exchange(exchange, ensure=False)
    await target.publish(aio_pika.Message(body, delivery_mode=2, **properties), routing_key)
    await channel.close()
    return str(properties["message_id"])


async def test_handled_messages_are_acked(world, admin, unique):
    """Every dispatched event is handled once and nothing is left in the queue."""
    for i in range(20):
        await world.app.dispatch(Ping(id=f"p{i}"))
    await wait_for(lambda: sum(1 for kind, *_ in world.seen if kind == "handled") == 20)
    assert await world.stop() == StopReason.REQUESTED
    assert world.worker.stats.handled == 20
    assert await queue_depth(admin, unique) == 0
    assert all(world.count("handled", f"p{i}") == 1 for i in range(20))


async def test_deliveries_come_straight_from_the_reader_and_large_bodies_arrive_whole(amqp_url, admin, unique):
    """Each delivery goes from the connection's reader to the worker (aiormq's channel queue and its task per
    delivery skipped), and a body larger than the broker's frame size (131,072 bytes) arrives whole from its
    several frames, handled and acked like any other.
    """
    world = World(amqp_url, unique, max_body_size=1_048_576)
    worker = world.start()
    try:
        await wait_for(lambda: bool(worker.transport._consumers))  # type: ignore[attr-defined]
        big = "big-" + "x" * 300_000
        await world.app.dispatch(Ping(id=big))
        for i in range(50):
            await world.app.dispatch(Ping(id=f"p{i}"))
        await wait_for(lambda: sum(1 for kind, *_ in world.seen if kind == "handled") == 51)
        assert world.count("handled", big) == 1
        underlay = await worker.transport._consume_channel.get_underlay_channel()  # type: ignore[attr-defined]
        assert _Shortcut.on(underlay).taken == 51
        assert await world.stop() == StopReason.REQUESTED
        assert worker.stats.handled == 51
        assert await queue_depth(admin, unique) == 0
    finally:
        await world.app.close()


async def test_retry_through_real_delay_queue(world, admin, unique):
    """A listener failing once is retried after its delay through the delay queue, then acked."""
    await world.app.dispatch(Fail(id="f1", failures=1))
    await wait_for(lambda: world.count("handled", "f1") == 1)
    first, second = (at for kind, i, at in world.seen if kind == "attempt" and i == "f1")
    assert second - first >= 0.3
    assert world.worker.stats.retried == 1
    await world.stop()
    assert await queue_depth(admin, unique) == 0
    assert await queue_depth(admin, unique + ".delay.320") == 0


async def test_exhausted_retries_dead_letter_with_error_headers(world, admin, unique):
    """After max_attempts the message is in Q.dead with the original body and the recorded error."""
    await world.app.dispatch(Fail(id="d1"))
    [dead] = await dead_letters(admin, unique)
    headers = dead.headers
    assert world.count("attempt", "d1") == 3
    assert dead.body == b'{"id":"d1","failures":1000}'
    assert headers[H_DEAD_REASON] == "retries_exhausted"
    assert dead_reason_of(headers) == "retries_exhausted"
    assert headers[H_ERROR_TYPE] == "RuntimeError"
    assert headers[H_ERROR_MESSAGE] == "fail d1 attempt 3"
    assert "RuntimeError: fail d1 attempt 3" in headers[H_ERROR_TRACEBACK]
    assert headers[H_ATTEMPT] == 3
    assert headers[H_LISTENER] == "tests:fail"
    assert headers[H_EVENT] == "qtest.consumer.fail"
    assert headers[H_ORIGINAL_QUEUE] == unique
    assert headers[H_CONSUMER_HOST] == socket.gethostname()
    assert headers[H_CONSUMER_PID] == os.getpid()
    assert headers[H_FIRST_FAILURE] < headers[H_LAST_FAILURE]
    await world.stop()
    assert world.worker.stats.dead_lettered == 1
    assert await queue_depth(admin, unique) == 0


GOOD_HEADERS = {H_LISTENER: "tests:ping", H_EVENT: "qtest.consumer.ping"}
BAD_INPUTS: dict[str, tuple[bytes, dict[str, Any], dict[str, Any]]] = {
    "not_json": (b"{not json", GOOD_HEADERS, {}),
    "not_utf8": (b'{"id": "\xff\xfe"}', GOOD_HEADERS, {}),
    "schema": (b'{"name": "no id"}', GOOD_HEADERS, {}),
    "unknown_listener": (b'{"id": "x"}', {**GOOD_HEADERS, H_LISTENER: "os:system"}, {}),
    "missing_listener": (b'{"id": "x"}', {H_EVENT: "qtest.consumer.ping"}, {}),
    "unknown_event": (b'{"id": "x"}', {**GOOD_HEADERS, H_EVENT: "qtest.no.such.event"}, {}),
    "oversized": (b'{"id": "' + b"x" * MAX_BODY + b'"}', GOOD_HEADERS, {}),
    "content_type": (b'{"id": "x"}', GOOD_HEADERS, {"content_type": "text/plain"}),
    "unsupported_wire": (b'{"id": "x"}', {**GOOD_HEADERS, "x-queueable-wire": 2}, {}),
    "bad_header": (b'{"id": "x"}', {**GOOD_HEADERS, "x-queueable-event-version": "v2"}, {}),
}


@pytest.mark.parametrize("reason", list(BAD_INPUTS))
async def test_bad_input_is_dead_lettered_and_consumer_goes_on(world, admin, unique, reason):
    """Each kind of bad input lands in Q.dead with its reason, and the next good message is still handled."""
    body, headers, properties = BAD_INPUTS[reason]
    message_id = await publish_raw(admin, unique, unique, body, headers=headers, **properties)
    [dead] = await dead_letters(admin, unique)
    assert dead.message_id == message_id
    assert dead.body == body
    assert dead.headers[H_DEAD_REASON] == reason
    assert dead.headers[H_ERROR_MESSAGE]
    await world.app.dispatch(Ping(id="after"))
    await wait_for(lambda: world.count("handled", "after") == 1)
    assert world.worker.stats.dead_lettered == 1


async def test_a_compressed_body_is_refused_for_its_encoding_and_keeps_it(world, admin, unique):
    """gzip'd JSON used to be dead-lettered as not_utf8, and the copy lost the encoding (a copy has no such
    property). It is refused for its encoding, and the dead letter says which in a header.
    """
    import gzip  # noqa: PLC0415

    body = gzip.compress(b'{"id": "zipped"}')
    message_id = await publish_raw(admin, unique, unique, body, headers=GOOD_HEADERS, content_encoding="gzip")
    [dead] = await dead_letters(admin, unique)
    assert dead.message_id == message_id
    assert dead.body == body
    assert dead.headers[H_DEAD_REASON] == "content_type"
    assert "content encoding 'gzip' is not supported" in dead.headers[H_ERROR_MESSAGE]
    assert dead.headers["x-queueable-content-encoding"] == "gzip"


async def test_dead_letter_publish_failure_requeues_original(amqp_url, admin, unique):
    """With Q.dead deleted, the dead-letter copy is unroutable: the original is requeued, never acked, and
    reaches Q.dead once the queue exists again.
    """
    # A high delivery limit, so that the broker does not dead-letter the requeued message by itself.
    world = World(amqp_url, unique, delivery_limit=100_000)
    worker = world.start()
    try:
        await wait_for(lambda: bool(worker.transport._consumers))  # type: ignore[attr-defined]
        channel = await admin.channel()
        await channel.queue_delete(unique + ".dead")
        message_id = await publish_raw(admin, unique, unique, b"{not json", headers=GOOD_HEADERS)
        await wait_for(lambda: worker.stats.requeued >= 2)  # delivered, requeued, redelivered, requeued
        assert worker.stats.failed_outcomes >= 2
        assert worker.stats.dead_lettered == 0
        # The original is still the broker's (requeued), not lost: give the DLQ back and it arrives there.
        await worker.transport.declare_topology([unique])
        [dead] = await dead_letters(admin, unique)
        assert dead.message_id == message_id
        assert dead.headers[H_DEAD_REASON] == "not_json"
        await world.stop()
    finally:
        await world.app.close()


#: A header that the broker accepts (its frame_max is 131,072 bytes) and that leaves room for a retry copy's
#: error headers (about 1.3 KB here) but not for a dead letter's, which add the traceback.
NEAR_FRAME_MAX = 128_800


async def test_a_message_too_large_for_one_frame_fails_alone_and_the_connection_lives(world, unique):
    """A header frame over the broker's frame_max would make RabbitMQ close the whole connection (FRAME_ERROR),
    failing every publish and delivery on it. The transport refuses that message alone, before it is sent.
    """
    transport = world.app.transport
    assert isinstance(transport, RabbitMQTransport)
    await world.app.dispatch(Ping(id="before"))
    huge = OutgoingMessage(
        queue=unique, body=b'{"id": "x"}', headers={H_LISTENER: "tests:ping", "x-blob": "y" * 140_000}
    )
    fine = OutgoingMessage(queue=unique, body=b'{"id": "fine"}', headers={H_LISTENER: "tests:ping"})
    with pytest.raises(MessageTooLargeError, match="properties and headers take 140,"):
        await transport.publish([huge])
    with pytest.raises(MessageTooLargeError) as caught:
        await transport.publish([fine, huge])  # the batch's other message is still published
    assert caught.value.message_ids == [huge.message_id]
    await world.app.dispatch(Ping(id="after"))  # same connection: it was never closed
    await wait_for(lambda: world.count("handled", "fine") == 1 and world.count("handled", "after") == 1)
    assert world.count("handled", "x") == 0


async def test_a_failure_copy_too_large_for_one_frame_goes_without_its_traceback(world, admin, unique, caplog):
    """A message whose own headers nearly fill a frame fails until its retries are exhausted: its dead letter
    would not fit with the error headers and the traceback, so it goes without the traceback and with a short
    error message, instead of being requeued forever (which also closed the worker's connection each time).
    """
    blob = "y" * NEAR_FRAME_MAX
    long_id = "b" * 900  # a 900-character error message, in the copies and in the traceback
    headers = {H_LISTENER: "tests:fail", H_EVENT: "qtest.consumer.fail", "x-blob": blob}
    message_id = await publish_raw(admin, unique, unique, f'{{"id": "{long_id}"}}'.encode(), headers=headers)
    [dead] = await dead_letters(admin, unique, timeout=15)
    assert dead.message_id == message_id
    assert dead.headers["x-blob"] == blob  # the producer's headers are kept
    assert dead.headers[H_DEAD_REASON] == "retries_exhausted"
    assert dead.headers[H_ERROR_MESSAGE].startswith(f"fail {long_id[:100]}")
    assert len(dead.headers[H_ERROR_MESSAGE]) <= 200
    assert H_ERROR_TRACEBACK not in dead.headers
    assert world.count("attempt", long_id) == 3
    assert "copy is too large" in caplog.text
    await world.app.dispatch(Ping(id="after"))
    await wait_for(lambda: world.count("handled", "after") == 1)


async def test_a_message_whose_own_headers_fill_a_frame_is_dead_lettered_without_them(world, admin, unique):
    """The broker took the message, but no copy with the error headers fits in a frame, even without the
    traceback: it is dead-lettered (reason oversized) with its body and queueable's own headers, naming the
    producer's headers it had to leave out, instead of being requeued for ever.
    """
    blob = "y" * 130_700  # the incoming header frame fits (131,064 bytes at most); a copy with any error does not
    headers = {H_LISTENER: "tests:fail", H_EVENT: "qtest.consumer.fail", "x-blob": blob, "x-trace": "t-1"}
    message_id = await publish_raw(admin, unique, unique, b'{"id": "full"}', headers=headers)
    [dead] = await dead_letters(admin, unique, timeout=15)
    assert dead.message_id == message_id
    assert dead.body == b'{"id": "full"}'
    assert dead.headers[H_DEAD_REASON] == "oversized"
    assert dead.headers[H_LISTENER] == "tests:fail"
    assert dead.headers["x-queueable-dropped-headers"] == "x-blob, x-trace"
    assert "x-blob" not in dead.headers
    assert "fail full attempt 1" in dead.headers[H_ERROR_MESSAGE]
    assert world.count("attempt", "full") == 1
    await world.app.dispatch(Ping(id="after"))
    await wait_for(lambda: world.count("handled", "after") == 1)


async def test_graceful_stop_lets_running_handler_finish(world, admin, unique):
    """A handler running at stop() finishes within the shutdown timeout and its message is acked."""
    await world.app.dispatch(Slow(id="s1", seconds=0.5))
    await wait_for(lambda: world.count("started", "s1") == 1)
    assert await world.stop() == StopReason.REQUESTED
    assert world.count("handled", "s1") == 1
    assert await queue_depth(admin, unique) == 0


async def test_shutdown_timeout_requeues_unfinished(amqp_url, admin, unique):
    """A handler still running after the shutdown timeout is cancelled and its message requeued."""
    world = World(amqp_url, unique)
    worker = world.start(shutdown_timeout=0.3)
    try:
        await world.app.dispatch(Slow(id="s2", seconds=30))
        await wait_for(lambda: world.count("started", "s2") == 1)
        started = time.monotonic()
        assert await world.stop() == StopReason.REQUESTED
        assert time.monotonic() - started < 3
        assert world.count("handled", "s2") == 0
        assert worker.stats.requeued == 1
        assert worker.abandoned == 1
        await wait_for_depth(admin, unique, 1)
    finally:
        await world.app.close()


async def wait_for_depth(admin: aio_pika.abc.AbstractConnection, queue: str, depth: int) -> None:
    """Wait until ``queue`` holds ``depth`` ready messages."""
    deadline = time.monotonic() + 5
    while await queue_depth(admin, queue) != depth:
        if time.monotonic() > deadline:
            pytest.fail(f"{queue} never held {depth} messages")
        await asyncio.sleep(0.05)


async def test_max_messages_stops_and_leaves_the_rest(amqp_url, admin, unique):
    """--max-messages: the worker takes exactly that many, stops cleanly, and the rest stay queued."""
    world = World(amqp_url, unique)
    for i in range(10):
        await world.app.dispatch(Ping(id=f"m{i}"))
    worker = world.start(max_messages=4, concurrency=2, prefetch=10)
    try:
        reason = await asyncio.wait_for(world.task, 10)  # type: ignore[arg-type]
        assert reason == StopReason.MAX_MESSAGES
        assert worker.stats.handled == 4
        await wait_for_depth(admin, unique, 6)
    finally:
        await world.app.close()


async def test_time_limit_stops_cleanly(amqp_url, admin, unique):
    """--time-limit: the worker stops by itself with TIME_LIMIT."""
    world = World(amqp_url, unique)
    world.start(time_limit=0.5)
    try:
        assert await asyncio.wait_for(world.task, 10) == StopReason.TIME_LIMIT  # type: ignore[arg-type]
    finally:
        await world.app.close()


async def test_consumer_recovers_when_its_queue_is_deleted(world, admin, unique):
    """A work queue deleted under the worker (broker-side consumer cancel) is re-declared, re-bound and
    consumed again without a restart.
    """
    await world.app.dispatch(Ping(id="before"))
    await wait_for(lambda: world.count("handled", "before") == 1)
    channel = await admin.channel()
    await channel.queue_delete(unique)
    deadline = time.monotonic() + 8
    sent = 0
    while world.count("handled", "after") == 0:
        assert time.monotonic() < deadline, "the worker did not resume consuming"
        await asyncio.sleep(0.2)
        try:
            await world.app.dispatch(Ping(id="after"))
            sent += 1
        except PublishError:  # unroutable until the binding is restored
            pass
    await wait_for(lambda: world.count("handled", "after") == sent)
