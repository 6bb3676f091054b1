"""SyncDispatcher and deferred() against the real broker and a real ``queueable-consume`` process."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

import pytest

from _outbox_db import drain_ids
from apps.recorder import Job, create_app
from queueable import PublishError
from queueable.sync import SyncDispatcher

if TYPE_CHECKING:
    from _consumer_process import World


async def test_threads_dispatch_through_a_sync_dispatcher_and_every_message_is_confirmed(world: World):
    """Eight threads, forty dispatches: when each returns its message is on the broker; close() is clean."""
    app = create_app(url=world.url, default_queue=world.queue, exchange=world.exchange)
    ids: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        with SyncDispatcher(app) as events:

            def worker(n: int) -> None:
                for i in range(5):
                    job = events.dispatch(Job(id=f"t{n}-{i}"))
                    with lock:
                        ids.append(job.id)

            threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(20)
            assert events._thread is not None
            loop_thread = events._thread
        assert not loop_thread.is_alive()

    await asyncio.to_thread(run)

    assert len(ids) == 40
    assert len(await drain_ids(world.url, world.queue, expected=40)) == 40


async def test_a_sync_dispatch_with_the_broker_down_raises_in_the_caller(unique: str):
    """No broker: dispatch() raises PublishError in the calling thread, as the async dispatcher does."""
    app = create_app(url="amqp://guest:guest@127.0.0.1:1/", default_queue=unique, connect_timeout=0.5)

    def run() -> BaseException | None:
        with SyncDispatcher(app) as events:
            try:
                events.dispatch(Job(id="lost"))
            except Exception as exc:
                return exc
        return None

    error = await asyncio.to_thread(run)
    assert isinstance(error, PublishError), repr(error)
    assert "cannot connect" in str(error)


async def test_deferred_events_reach_a_real_worker_after_the_block(world: World):
    """deferred() on the real transport: nothing on the broker inside the block, all handled after it."""
    await world.start()
    app = await world.app()
    ids = [f"d{i}" for i in range(20)]
    async with app.dispatcher.deferred():
        for event_id in ids:
            await app.dispatch(Job(id=event_id))
        await asyncio.sleep(0.3)
        assert world.handled() == {}

    counts = await world.until_handled(ids, timeout=20)
    assert all(counts[event_id] == 1 for event_id in ids)


async def test_a_failed_deferred_block_leaves_nothing_on_the_broker(world: World):
    """The discarded buffer of a failed block never reaches RabbitMQ."""
    app = await world.app()
    await app.dispatch(Job(id="before"))  # declares the topology
    with pytest.raises(RuntimeError):  # noqa: PT012 - raised inside the scope under test
        async with app.dispatcher.deferred():
            await app.dispatch(Job(id="dropped"))
            raise RuntimeError
    assert len(await drain_ids(world.url, world.queue, expected=1)) == 1
