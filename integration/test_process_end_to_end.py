"""End to end through the real ``queueable-consume`` process: dispatch in this process, handle in the child."""

from __future__ import annotations

import itertools
import json
import signal
import uuid
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from apps.recorder import Doomed, Flaky, Job
from queueable import DeadReason

if TYPE_CHECKING:
    from _consumer_process import World

LISTENER_JOB = "apps.recorder:record_job"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_every_dispatched_event_is_handled_exactly_once(world: World) -> None:
    """N events dispatched to a running consumer are each handled exactly once."""
    consumer = await world.start("--prefetch", "16")
    app = await world.app()
    ids = [f"job-{i}" for i in range(60)]
    for event_id in ids:
        await app.dispatch(Job(id=event_id))

    counts = await world.until_handled(ids, timeout=30)

    assert set(counts) == set(ids)
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n != 1}
    assert consumer.returncode is None
    assert await world.queue_state(world.dead_queue) == (0, 0)


async def test_a_listener_failing_twice_then_succeeding_is_handled_once_after_three_attempts(world: World) -> None:
    """A listener that fails twice is retried after its delays and then handled once, not dead-lettered."""
    await world.start()
    app = await world.app()
    await app.dispatch(Flaky(id="flaky-1", failures=2))

    await world.until_handled(["flaky-1"], timeout=20)

    attempts = [line for line in world.records() if line.kind == "attempt"]
    assert len(attempts) == 3
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.2 * 0.9  # initial_delay, no jitter
    assert gaps[1] >= 0.4 * 0.9  # initial_delay * multiplier
    assert world.handled() == {"flaky-1": 1}
    assert await world.queue_state(world.dead_queue) == (0, 0)


async def test_a_listener_that_always_fails_is_dead_lettered_with_its_error_after_max_attempts(
    world: World,
) -> None:
    """After 3 attempts (0.2 s, then 0.4 s apart) the message lands in Q.dead with the recorded error."""
    consumer = await world.start()
    app = await world.app()
    await app.dispatch(Doomed(id="doomed-1"))

    [dead] = await world.take_dead(1, timeout=20)

    attempts = [line for line in world.records() if line.kind == "attempt"]
    assert len(attempts) == 3
    assert attempts[1].at - attempts[0].at >= 0.2 * 0.9
    assert attempts[2].at - attempts[1].at >= 0.4 * 0.9
    headers = dead.headers
    assert json.loads(dead.body) == {"id": "doomed-1"}
    assert _text(headers["x-queueable-dead-reason"]) == DeadReason.RETRIES_EXHAUSTED
    assert _text(headers["x-queueable-error-type"]) == "RuntimeError"
    assert _text(headers["x-queueable-error-message"]) == "doomed doomed-1"
    assert "doomed doomed-1" in _text(headers["x-queueable-error-traceback"])
    assert headers["x-queueable-attempt"] == 3
    assert _text(headers["x-queueable-listener"]) == "apps.recorder:doomed"
    assert _text(headers["x-queueable-event"]) == "qtest.doomed"
    assert _text(headers["x-queueable-original-queue"]) == world.queue
    assert headers["x-queueable-consumer-pid"] == consumer.pid
    assert _text(headers["x-queueable-first-failure-at"]) <= _text(headers["x-queueable-last-failure-at"])
    assert world.handled() == {}
    assert consumer.returncode is None


def _headers(listener: str | None = LISTENER_JOB, event: str | None = "qtest.job") -> dict[str, object]:
    headers: dict[str, object] = {"x-queueable-wire": 1, "x-queueable-attempt": 1}
    if listener is not None:
        headers["x-queueable-listener"] = listener
    if event is not None:
        headers["x-queueable-event"] = event
    return headers


BAD_INPUTS: dict[DeadReason, tuple[bytes, dict[str, object], str]] = {
    DeadReason.NOT_JSON: (b'{"id": ', _headers(), "application/json"),
    DeadReason.NOT_UTF8: (b'{"id": "\xff\xfe"}', _headers(), "application/json"),
    DeadReason.SCHEMA: (b'{"identifier": 7}', _headers(), "application/json"),
    DeadReason.UNKNOWN_LISTENER: (b'{"id": "x"}', _headers(listener="os:system"), "application/json"),
    DeadReason.MISSING_LISTENER: (b'{"id": "x"}', _headers(listener=None), "application/json"),
    DeadReason.UNKNOWN_EVENT: (b'{"id": "x"}', _headers(event="qtest.nope"), "application/json"),
    DeadReason.OVERSIZED: (json.dumps({"id": "x" * 5000}).encode(), _headers(), "application/json"),
    DeadReason.CONTENT_TYPE: (b'{"id": "x"}', _headers(), "application/x-python-pickle"),
    DeadReason.UNSUPPORTED_WIRE: (b'{"id": "x"}', {**_headers(), "x-queueable-wire": 2}, "application/json"),
    DeadReason.BAD_HEADER: (b'{"id": "x"}', {**_headers(), "x-queueable-event-version": 2.5}, "application/json"),
}


@pytest.mark.slow
async def test_every_bad_input_is_dead_lettered_with_its_reason_and_the_consumer_keeps_running(
    world: World,
) -> None:
    """Each kind of bad message goes to Q.dead with its own reason; good messages around them are handled."""
    consumer = await world.start(env=world.env(QUEUEABLE_MAX_BODY_SIZE="4096"))
    app = await world.app()
    await app.dispatch(Job(id="before"))
    sent: dict[str, DeadReason] = {}
    for reason, (body, headers, content_type) in BAD_INPUTS.items():
        message_id = f"bad-{reason}-{uuid.uuid4().hex[:6]}"
        await world.publish_raw(body, headers, content_type=content_type, message_id=message_id)
        sent[message_id] = reason
    await app.dispatch(Job(id="after"))

    dead = await world.take_dead(len(BAD_INPUTS), timeout=20)
    await world.until_handled(["before", "after"], timeout=10)

    reasons = {message.message_id: _text(message.headers["x-queueable-dead-reason"]) for message in dead}
    assert reasons == {message_id: str(reason) for message_id, reason in sent.items()}
    for message in dead:
        assert message.body == BAD_INPUTS[DeadReason(reasons[message.message_id])][0]  # the original body
        assert _text(message.headers["x-queueable-original-queue"]) == world.queue
        assert _text(message.headers["x-queueable-error-message"])
    assert world.handled() == {"before": 1, "after": 1}
    assert consumer.returncode is None


async def test_json_log_format_writes_one_json_object_per_line_without_the_password(world: World) -> None:
    """With --log-format json every output line is a JSON object, the dead letter is logged, no password shows."""
    consumer = await world.start("--log-format", "json")
    app = await world.app()
    await app.dispatch(Doomed(id="logged"))
    await world.take_dead(1, timeout=20)
    consumer.signal(signal.SIGTERM)
    assert await consumer.wait(timeout=15) == 0

    lines = consumer.output().splitlines()
    records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    assert all(isinstance(record, dict) and "level" in record and "message" in record for record in records)
    assert any(record["level"] == "warning" and "dead-letter" in record["message"] for record in records), lines
    password = urlsplit(world.url).password
    assert password
    assert any(":***@" in line for line in lines)  # the URL is logged, masked
    assert not any(f":{password}@" in line for line in lines)
