"""How ``queueable-consume`` ends: limits are clean exits (0), a missing broker is 3, a bad APP is 5."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from _rabbit_node import free_port
from apps.recorder import Job

if TYPE_CHECKING:
    from _consumer_process import World


async def test_max_messages_exits_0_after_exactly_that_many_and_leaves_the_rest_queued(world: World) -> None:
    """With --max-messages 5 the worker handles 5 messages, exits 0, and the other 7 wait in the queue."""
    app = await world.app()  # declares the topology, so the messages wait for the worker
    ids = [f"job-{i}" for i in range(12)]
    for event_id in ids:
        await app.dispatch(Job(id=event_id))

    consumer = world.spawn("--max-messages", "5", "--concurrency", "2", "--prefetch", "8")

    assert await consumer.wait(timeout=20) == 0, world.outputs()
    assert sum(world.handled().values()) == 5
    assert all(n == 1 for n in world.handled().values())
    assert await world.queue_state() == (7, 0)


async def test_time_limit_exits_0_when_it_expires(world: World) -> None:
    """With --time-limit 1 an idle worker exits 0 about a second after it started consuming."""
    consumer = await world.start("--time-limit", "1")
    started = time.monotonic()

    assert await consumer.wait(timeout=15) == 0, world.outputs()
    assert time.monotonic() - started < 5


async def test_memory_limit_exits_0_after_the_message_that_crossed_it(world: World) -> None:
    """With --memory-limit 1 (MB, always exceeded) the worker finishes one message, takes no other, exits 0."""
    app = await world.app()
    ids = [f"m-{i}" for i in range(6)]
    for event_id in ids:
        await app.dispatch(Job(id=event_id))

    consumer = world.spawn("--memory-limit", "1", "--concurrency", "1", "--prefetch", "8")

    assert await consumer.wait(timeout=15) == 0, world.outputs()
    assert sum(world.handled().values()) == 1, world.handled()
    assert await world.queue_state() == (len(ids) - 1, 0)  # the buffered ones went back: nothing lost


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param("apps.no_such_module:app", ["apps.no_such_module"], id="cannot-import"),
        pytest.param(
            "apps.fails_at_import:app",
            ["KeyError: 'QTEST_NO_SUCH_SETTING'", "fails_at_import.py:7"],  # the app's own file and line
            id="fails-at-import",
        ),
        # Such a worker would dead-letter whatever another app put in the default queue as unknown listeners.
        pytest.param("apps.nothing_queued:app", ["registers no queued listener"], id="nothing-queued"),
    ],
)
def test_an_app_a_worker_cannot_run_exits_5_with_one_line(world: World, spec: str, expected: list[str]) -> None:
    """An APP that cannot be imported, fails at import, or has nothing to run: exit code 5, no traceback."""
    consumer = world.spawn_app(spec)

    assert consumer.proc.wait(timeout=30) == 5
    output = consumer.output()
    assert all(text in output for text in expected), output
    assert "Traceback" not in output


def test_an_unreachable_broker_exits_3_without_showing_the_password(world: World) -> None:
    """A broker that does not answer is exit code 3, and the error never shows the URL's password."""
    url = f"amqp://guest:s3cret-pw@127.0.0.1:{free_port()}/"
    consumer = world.spawn(env=world.env(QUEUEABLE_URL=url, QUEUEABLE_CONNECT_TIMEOUT="2"))

    assert consumer.proc.wait(timeout=30) == 3, consumer.output()
    output = consumer.output()
    assert "s3cret-pw" not in output
    assert "127.0.0.1" in output
