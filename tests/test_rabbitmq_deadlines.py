"""The shared publish-deadline timer ends a publish exactly like ``asyncio.timeout`` would."""

from __future__ import annotations

import asyncio

import pytest

from queueable.transport.rabbitmq import _Deadlines


async def _guarded(deadlines: _Deadlines, timeout: float, work: float) -> str:
    async with asyncio.timeout(None) as scope:
        deadlines.watch(scope, timeout)
        try:
            await asyncio.sleep(work)
        finally:
            deadlines.forget(scope)
    return "done"


async def test_a_slow_publish_raises_timeout_error():
    """Work that outlasts its deadline ends with TimeoutError, about when the deadline passes."""
    deadlines = _Deadlines()
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError):
        await _guarded(deadlines, 0.05, 10)
    assert 0.04 <= loop.time() - start < 1


async def test_a_quick_publish_finishes_and_unregisters():
    """Work that ends in time returns normally and leaves nothing registered."""
    deadlines = _Deadlines()
    assert await _guarded(deadlines, 5, 0) == "done"
    assert deadlines._scopes == {}


async def test_many_publishes_share_one_timer_and_each_gets_its_own_deadline():
    """Concurrent publishes with staggered deadlines: the slow ones time out, the quick ones do not."""
    deadlines = _Deadlines()

    async def staggered(index: int) -> str:
        await asyncio.sleep(index * 0.01)
        return await _guarded(deadlines, 0.05, 0.0 if index % 2 else 10)

    results = await asyncio.gather(*(staggered(i) for i in range(6)), return_exceptions=True)
    assert [r == "done" for r in results] == [False, True, False, True, False, True]
    assert all(isinstance(r, TimeoutError) for r in results[::2])
    assert deadlines._scopes == {}


async def test_an_outer_cancellation_is_not_turned_into_a_timeout():
    """Cancelling the publishing task propagates CancelledError, not TimeoutError."""
    deadlines = _Deadlines()
    task = asyncio.create_task(_guarded(deadlines, 10, 10))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadlines._scopes == {}
