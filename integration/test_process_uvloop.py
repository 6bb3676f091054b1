"""``queueable-consume --loop uvloop``: the same worker on uvloop's event loop."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import pytest

from apps.recorder import Job

if TYPE_CHECKING:
    from _consumer_process import World

pytest.importorskip("uvloop")


async def test_uvloop_worker_handles_each_event_once_and_acks_all_before_exit(world: World) -> None:
    """On uvloop every event is handled exactly once, SIGTERM exits 0, and no handled message is left unacked."""
    consumer = await world.start("--loop", "uvloop", "--prefetch", "16")
    app = await world.app()
    ids = [f"uv-{i}" for i in range(40)]
    for event_id in ids:
        await app.dispatch(Job(id=event_id))

    counts = await world.until_handled(ids, timeout=30)
    consumer.signal(signal.SIGTERM)

    assert await consumer.wait(timeout=15) == 0, world.outputs()
    assert all(n == 1 for n in counts.values()), counts
    assert await world.queue_state() == (0, 0)  # an ack lost at exit would put its message back here
