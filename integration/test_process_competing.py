"""Several ``queueable-consume`` processes on one queue compete for its messages."""

from __future__ import annotations

from typing import TYPE_CHECKING

from apps.recorder import Job

if TYPE_CHECKING:
    from _consumer_process import World


async def test_two_consumer_processes_share_a_queue_and_handle_every_message_once(world: World) -> None:
    """With two consumers on one queue, every message is handled, none twice, and both did some of the work."""
    first = await world.start("--prefetch", "8")
    second = await world.start("--prefetch", "8")
    app = await world.app()
    ids = [f"job-{i}" for i in range(200)]
    for event_id in ids:
        await app.dispatch(Job(id=event_id))

    counts = await world.until_handled(ids, timeout=40)

    assert set(counts) == set(ids)
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n != 1}
    pids = {line.pid for line in world.records() if line.kind == "handled"}
    assert pids == {first.pid, second.pid}
    assert first.returncode is None
    assert second.returncode is None
