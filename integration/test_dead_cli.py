"""``queueable dead ...`` and ``queueable status`` against the real broker.

Dead letters here are made by the real decision function (:class:`queueable.Processor`) from real dispatch
messages and published to ``Q.dead`` exactly as a worker would; the broker-dead-lettered kind is made by the
broker itself (a quorum queue's delivery limit). The CLI runs as the installed ``queueable`` console script
where the behaviour is the process's (exit codes, ``--json``, SIGKILL); the rest drives
:class:`queueable._deadletters.DeadLetterAdmin` directly.

The module doubles as the test application: ``test_dead_cli:create_app`` (importable from ``integration/``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import urllib.parse
import urllib.request
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import pytest
from pydantic import BaseModel

from queueable import App, Reject, RetryPolicy, Settings, _deadletters, event
from queueable._consumer import DeadLetter
from queueable._deadletters import DeadFilter, DeadLetterAdmin
from queueable._dispatcher import build_messages
from queueable._wire import (
    H_ATTEMPT,
    H_DEAD_REASON,
    H_ERROR_TYPE,
    H_LISTENER,
    H_REPLAYS,
    IncomingMessage,
    OutgoingMessage,
)
from queueable._worker import Worker, WorkerOptions, WorkerStats
from queueable.transport.rabbitmq import RabbitMQTransport

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

INTEGRATION_DIR = Path(__file__).resolve().parent

# -- the test application ---------------------------------------------------------------------------------

#: Listener ids that fail while they are in here (the worker side of "the bug is fixed, now replay").
FAILING: set[str] = set()


@event("deadtest.order_placed")
class OrderPlaced(BaseModel):
    id: str


@event("deadtest.user_signed_up")
class UserSignedUp(BaseModel):
    id: str


def _maybe_fail(listener_id: str, exc: Exception) -> None:
    if listener_id in FAILING:
        raise exc


def send_mail(event: OrderPlaced) -> None:
    _maybe_fail("mail", Reject(f"mail server refused {event.id}"))


def charge(event: OrderPlaced) -> None:
    _maybe_fail("charge", TimeoutError(f"payment gateway timed out for {event.id}"))


def sync_crm(event: UserSignedUp) -> None:
    _maybe_fail("crm", ValueError(f"crm rejected {event.id}"))


def create_app() -> App:
    """The app the CLI loads (``--app test_dead_cli:create_app``), from ``QUEUEABLE_*`` variables."""
    app = App(settings=Settings.from_env(), default_retry=RetryPolicy.never())
    app.add_listener(send_mail, queue=True, id="mail")
    app.add_listener(charge, queue=True, id="charge")
    app.add_listener(sync_crm, queue=True, id="crm")
    return app


# -- a private corner of the broker -----------------------------------------------------------------------


@dataclass
class World:
    """One test's queue, dead-letter queue and exchange, declared by the real RabbitMQ transport."""

    url: str
    queue: str
    exchange: str
    queue_type: str
    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel

    @property
    def dead(self) -> str:
        return self.queue + ".dead"

    @property
    def settings(self) -> Settings:
        return Settings(
            url=self.url,
            default_queue=self.queue,
            exchange=self.exchange,
            queue_type=self.queue_type,  # type: ignore[arg-type]
            delivery_limit=3,
            publish_timeout=5.0,
        )

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            QUEUEABLE_URL=self.url,
            QUEUEABLE_QUEUE=self.queue,
            QUEUEABLE_EXCHANGE=self.exchange,
            QUEUEABLE_QUEUE_TYPE=self.queue_type,
            PYTHONPATH=str(INTEGRATION_DIR),
        )
        return env

    def app(self) -> App:
        app = App(settings=self.settings, default_retry=RetryPolicy.never())
        app.add_listener(send_mail, queue=True, id="mail")
        app.add_listener(charge, queue=True, id="charge")
        app.add_listener(sync_crm, queue=True, id="crm")
        return app

    def admin(self) -> DeadLetterAdmin:
        return DeadLetterAdmin(self.settings, [self.queue])

    async def run_worker(self, messages: int, *, clock: float | None = None) -> WorkerStats:
        """The real in-process worker on this queue until it has taken ``messages`` messages."""
        return await self.run_worker_on(self.queue, messages, clock=clock)

    async def run_worker_on(
        self, queue: str, messages: int, *, clock: float | None = None, failing: set[str] | None = None
    ) -> WorkerStats:
        """The real in-process worker on ``queue`` until it has taken ``messages`` messages."""
        app = self.app()
        processor = app.processor(clock=(lambda: clock) if clock is not None else time.time)
        transport = RabbitMQTransport(self.settings, queues=[queue])
        FAILING.update(failing or ())
        worker = Worker(
            processor,
            transport,
            WorkerOptions(queues=(queue,), prefetch=1, concurrency=1, max_messages=messages, shutdown_timeout=5),
        )
        try:
            await asyncio.wait_for(worker.run(), timeout=20)
        finally:
            FAILING.difference_update(failing or ())
            await transport.close()
        return worker.stats

    async def kill(
        self, events: list[BaseModel], listener_ids: set[str], *, clock: float | None = None
    ) -> list[str]:
        """Dispatch ``events`` and let the real worker run them while ``listener_ids`` fail.

        Returns the message ids of the new dead letters, in dead-letter-queue order.
        """
        before = await self.peek(self.dead)
        app = self.app()
        transport = RabbitMQTransport(self.settings, queues=[self.queue])
        app.use_transport(transport)
        try:
            for ev in events:
                await app.dispatch(ev)
        finally:
            await transport.close()
        published = sum(1 for ev in events for entry in app.provider.listeners_for(ev) if entry.queue)
        FAILING.update(listener_ids)
        try:
            stats = await self.run_worker(published, clock=clock)
        finally:
            FAILING.difference_update(listener_ids)
        assert stats.handled + stats.dead_lettered == published, stats
        after = await self.peek(self.dead)
        assert after[: len(before)] == before
        return [i for i in after[len(before) :] if i is not None]

    async def publish_dead(self, out: Any) -> None:
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                out.body,
                headers=out.headers,
                message_id=out.message_id,
                correlation_id=out.correlation_id,
                content_type=out.content_type,
                timestamp=int(out.timestamp),
                type=out.type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=out.queue,
            mandatory=True,
        )

    async def ready(self, queue: str) -> int:
        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result.message_count or 0
        finally:
            await channel.close()

    async def peek(self, queue: str) -> list[str | None]:
        """The message ids in ``queue``, in order, without removing them (read all, one ordered requeue)."""
        return [message_id for message_id, _ in await self.peek_listeners(queue)]

    async def peek_listeners(self, queue: str) -> list[tuple[str | None, Any]]:
        """(message id, listener header) of each message in ``queue``, in order, leaving them there."""
        channel = await self.connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        held = []
        while (message := await q.get(no_ack=False, fail=False)) is not None:
            held.append(message)
        if held:
            await held[-1].nack(requeue=True, multiple=True)
        await channel.close()
        return [(m.message_id, (m.headers or {}).get(H_LISTENER)) for m in held]

    async def drain(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take every message out of ``queue`` for good (ack), in queue order."""
        channel = await self.connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        out = []
        while (message := await q.get(no_ack=False, fail=False)) is not None:
            await message.ack()
            out.append(message)
        await channel.close()
        return out

    async def settled(self, queue: str, expected: int, timeout: float = 5.0) -> int:
        """The ready count once it reaches ``expected`` (or whatever it is after ``timeout``)."""
        deadline = time.monotonic() + timeout
        count = await self.ready(queue)
        while count != expected and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            count = await self.ready(queue)
        return count


async def _world(amqp_url: str, unique: str, queue_type: str) -> World:
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    world = World(amqp_url, f"{unique}.q", f"{unique}.x", queue_type, connection, channel)
    transport = RabbitMQTransport(world.settings, queues=[world.queue])
    try:
        await transport.declare_topology()
    finally:
        await transport.close()
    return world


async def _destroy(world: World) -> None:
    channel = await world.connection.channel()
    for name in (world.queue, world.dead):
        await channel.queue_delete(name)
    await channel.exchange_delete(world.exchange)
    await world.connection.close()


@pytest.fixture(name="world", params=["quorum", "classic"])
async def fixture_world(amqp_url: str, unique: str, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    """The transport's topology for a private queue, as quorum and as classic queues."""
    world = await _world(amqp_url, unique, request.param)
    yield world
    await _destroy(world)


@pytest.fixture(name="quorum_world")
async def fixture_quorum_world(amqp_url: str, unique: str) -> AsyncIterator[World]:
    """Only the default (quorum) layout, for tests whose point is not the queue type."""
    world = await _world(amqp_url, unique, "quorum")
    yield world
    await _destroy(world)


def cli(world: World, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the installed ``queueable`` console script."""
    script = Path(sys.executable).with_name("queueable")
    return subprocess.run(
        [str(script), *args],
        env=world.env,
        cwd=INTEGRATION_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def order_of(world: World, queue: str) -> list[str | None]:
    """The message ids in ``queue``, in order, read destructively (the final word on order)."""
    return [m.message_id for m in await world.drain(queue)]


# -- list and show ---------------------------------------------------------------------------------------------


async def test_list_and_show_leave_count_and_order_unchanged(world: World) -> None:
    """Listing (with and without --limit) and showing, repeatedly, leave the dead letters in place and in order."""
    ids = await world.kill([OrderPlaced(id=f"o{i}") for i in range(6)], {"mail", "charge"})
    assert len(ids) == 12
    for args in (["dead", "list", "--json"], ["dead", "list", "--limit", "2"], ["dead", "show", ids[5]]):
        for _ in range(2):
            result = await asyncio.to_thread(cli, world, *args)
            assert result.returncode == 0, result.stderr
            assert await world.ready(world.dead) == 12
    listed = json_lines((await asyncio.to_thread(cli, world, "dead", "list", "--json")).stdout)
    assert [row["id"] for row in listed] == ids
    assert await order_of(world, world.dead) == ids


async def test_list_json_and_show_describe_the_dead_letter(quorum_world: World) -> None:
    """--json is one object per line with the recorded error; show prints error, traceback and the body."""
    world = quorum_world
    [mail_id, charge_id] = await world.kill([OrderPlaced(id="o1")], {"mail", "charge"})
    rows = json_lines((await asyncio.to_thread(cli, world, "dead", "list", "--json")).stdout)
    by_id = {row["id"]: row for row in rows}
    assert by_id[mail_id]["reason"] == "rejected"
    assert by_id[mail_id]["listener"] == "mail"
    assert by_id[mail_id]["error"] == "mail server refused o1"
    assert by_id[charge_id]["error_type"] == "TimeoutError"
    assert by_id[charge_id]["event"] == "deadtest.order_placed"
    assert by_id[charge_id]["original_queue"] == world.queue

    shown = await asyncio.to_thread(cli, world, "dead", "show", charge_id)
    assert shown.returncode == 0, shown.stderr
    assert "payment gateway timed out for o1" in shown.stdout
    assert "Traceback (most recent call last)" in shown.stdout
    assert '"id": "o1"' in shown.stdout  # the body, pretty-printed
    detail = json_lines((await asyncio.to_thread(cli, world, "dead", "show", charge_id, "--json")).stdout)
    assert detail[0]["headers"][H_ERROR_TYPE] == "TimeoutError"
    assert detail[0]["body"] == '{"id":"o1"}'


async def test_unknown_id_and_unreachable_broker_are_one_line_errors(quorum_world: World) -> None:
    """An unknown id exits 4, a dead broker exits 3, a bad --since exits 2: each one line, no traceback."""
    world = quorum_world
    missing = await asyncio.to_thread(cli, world, "dead", "show", "nope")
    assert missing.returncode == 4
    assert missing.stderr.startswith("error: no dead letter with id nope")
    assert "Traceback" not in missing.stderr
    down = await asyncio.to_thread(cli, world, "dead", "list", "--url", "amqp://guest:secret@127.0.0.1:1/")
    assert down.returncode == 3, down.stderr
    assert down.stderr.startswith("error: broker unreachable")
    assert "secret" not in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1
    bad = await asyncio.to_thread(cli, world, "dead", "list", "--since", "yesterday-ish")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --since: cannot read 'yesterday-ish'")
    assert len(bad.stderr.strip().splitlines()) == 1


async def test_filters_select_exactly_the_matching_letters(quorum_world: World) -> None:
    """--listener, --event, --error, --since, --limit and --group-by select and count exactly the right ones."""
    world = quorum_world
    old = time.time() - 3 * 3600
    old_ids = await world.kill([OrderPlaced(id="old")], {"mail", "charge"}, clock=old)
    orders = await world.kill([OrderPlaced(id="a"), OrderPlaced(id="b")], {"mail", "charge"})
    users = await world.kill([UserSignedUp(id="u")], {"crm"})
    everything = old_ids + orders + users

    async def listed(*args: str) -> list[str]:
        result = await asyncio.to_thread(cli, world, "dead", "list", "--json", *args)
        assert result.returncode == 0, result.stderr
        return [row["id"] for row in json_lines(result.stdout)]

    assert await listed() == everything
    assert await listed("--listener", "mail") == [everything[0], everything[2], everything[4]]
    assert await listed("--listener", "c*") == [everything[1], everything[3], everything[5], everything[6]]
    assert await listed("--event", "deadtest.user_*") == users
    assert await listed("--error", "TimeoutError") == [everything[1], everything[3], everything[5]]
    assert await listed("--error", "queueable.errors.Reject", "--event", "deadtest.order_placed") == [
        everything[0],
        everything[2],
        everything[4],
    ]
    assert await listed("--since", "1h") == orders + users
    assert await listed("--since", "1h", "--limit", "2") == orders[:2]
    grouped = json_lines(
        (await asyncio.to_thread(cli, world, "dead", "list", "--group-by", "listener", "--json")).stdout
    )
    assert grouped == [
        {"listener": "charge", "count": 3},
        {"listener": "mail", "count": 3},
        {"listener": "crm", "count": 1},
    ]
    assert await world.ready(world.dead) == len(everything)


async def test_queue_filter_selects_dead_letter_queues(quorum_world: World) -> None:
    """--queue Q (or Q.dead) looks only in that queue's dead letters; repeated, in the order given."""
    world = quorum_world
    other = world.queue + "2"
    transport = RabbitMQTransport(world.settings, queues=[other])
    try:
        await transport.declare_topology()
    finally:
        await transport.close()
    try:
        here = await world.kill([UserSignedUp(id="u1")], {"crm"})
        # The same kind of letter, dead in the other queue.
        [there] = await world.kill([UserSignedUp(id="u2")], {"crm"})
        moved = await asyncio.to_thread(cli, world, "dead", "replay", there, "--to", other)
        assert moved.returncode == 0, moved.stderr
        stats = await world.run_worker_on(other, 1, failing={"crm"})
        assert stats.dead_lettered == 1

        async def listed(*args: str) -> list[tuple[str, str]]:
            result = await asyncio.to_thread(cli, world, "dead", "list", "--json", *args)
            assert result.returncode == 0, result.stderr
            return [(row["id"], row["queue"]) for row in json_lines(result.stdout)]

        assert await listed() == [(here[0], world.dead)]
        assert await listed("--queue", other) == [(there, other + ".dead")]
        assert await listed("--queue", other + ".dead", "--queue", world.queue) == [
            (there, other + ".dead"),
            (here[0], world.dead),
        ]
    finally:
        channel = await world.connection.channel()
        for name in (other, other + ".dead"):
            await channel.queue_delete(name)
        await channel.close()


# -- replay ----------------------------------------------------------------------------------------------------


async def test_replay_subset_moves_exactly_that_subset_and_a_consumer_handles_it(world: World) -> None:
    """Replaying --listener charge moves only those letters (attempt 1, replays 1), the rest stay in order."""
    ids = await world.kill([OrderPlaced(id=f"o{i}") for i in range(2)], {"mail", "charge"})
    charge_ids = [i for i, listener in await world.peek_listeners(world.dead) if listener == "charge"]
    others = [i for i in ids if i not in charge_ids]
    assert len(charge_ids) == len(others) == 2
    result = await asyncio.to_thread(cli, world, "dead", "replay", "--all", "--listener", "charge", "--json")
    assert result.returncode == 0, result.stderr
    lines = json_lines(result.stdout)
    assert [line["id"] for line in lines if line.get("action") == "replayed"] == charge_ids
    assert lines[-1] == {"summary": "replayed", "count": 2, "queues": {world.queue: 2}}

    assert await world.peek(world.dead) == others
    assert await world.settled(world.queue, 2) == 2
    work_queue = await world.peek(world.queue)
    assert work_queue == charge_ids
    channel = await world.connection.channel()
    q = await channel.declare_queue(world.queue, passive=True)
    copy = await q.get(no_ack=False)
    headers = dict(copy.headers or {})
    assert headers[H_ATTEMPT] == 1
    assert headers[H_REPLAYS] == 1
    assert H_DEAD_REASON not in headers
    assert H_ERROR_TYPE not in headers
    await channel.close()  # back into the queue for the worker

    stats = await world.run_worker(len(charge_ids))  # the bug is fixed: the real worker handles them
    assert stats.handled == len(charge_ids)
    assert stats.dead_lettered == 0
    assert await world.ready(world.queue) == 0
    assert await order_of(world, world.dead) == others


async def test_replay_into_a_running_worker(quorum_world: World) -> None:
    """With a worker already consuming, replayed letters are handled as they arrive; the rest stay dead."""
    world = quorum_world
    ids = await world.kill([OrderPlaced(id=f"o{i}") for i in range(3)] + [UserSignedUp(id="u")], {"charge", "crm"})
    listeners = dict(await world.peek_listeners(world.dead))
    charge_ids = [i for i in ids if listeners[i] == "charge"]
    worker = asyncio.create_task(world.run_worker(len(charge_ids)))
    await asyncio.sleep(0.5)  # consuming
    result = await asyncio.to_thread(cli, world, "dead", "replay", "--all", "--event", "deadtest.order_placed")
    assert result.returncode == 0, result.stderr
    stats = await asyncio.wait_for(worker, timeout=20)
    assert stats.handled == len(charge_ids) == 3
    assert stats.dead_lettered == 0
    assert await world.peek(world.dead) == [i for i in ids if listeners[i] == "crm"]
    assert await world.ready(world.queue) == 0


async def test_replay_to_another_queue(quorum_world: World) -> None:
    """--to sends the copies to that work queue (a listener that moved), and says so."""
    world = quorum_world
    ids = await world.kill([UserSignedUp(id="u1"), UserSignedUp(id="u2")], {"crm"})
    other = world.queue + "2"
    transport = RabbitMQTransport(world.settings, queues=[other])
    try:
        await transport.declare_topology()
    finally:
        await transport.close()
    try:
        result = await asyncio.to_thread(cli, world, "dead", "replay", "--all", "--to", other)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"replayed 2 dead letters (2 to {other})"
        assert await world.settled(other, 2) == 2
        assert await world.peek(other) == ids
        assert await world.ready(world.queue) == 0
    finally:
        channel = await world.connection.channel()
        for name in (other, other + ".dead"):
            await channel.queue_delete(name)
        await channel.close()


async def test_browsing_a_large_queue_keeps_only_what_it_returns(world: World) -> None:
    """Reading a dead-letter queue of 20 MB to find one letter, or the first three, holds those in memory, not
    the queue; every letter stays where it was.
    """
    (template_id,) = await world.kill([OrderPlaced(id="big")], {"mail"})
    (template,) = await world.drain(world.dead)
    padding = b" " * 50_000  # JSON allows whitespace: each body stays a valid event
    ids = [f"{template_id}-{i:03d}" for i in range(400)]
    for message_id in ids:
        await world.channel.default_exchange.publish(
            aio_pika.Message(
                template.body + padding,
                headers=template.headers,
                message_id=message_id,
                content_type=template.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=world.dead,
            mandatory=True,
        )
    assert await world.settled(world.dead, 400) == 400  # all in place before the first read
    async with world.admin() as admin:
        tracemalloc.start()
        try:
            found = await admin.browse(DeadFilter(ids=frozenset({ids[250]})))
            _, peak_one = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            first = await admin.browse(limit=3)
            _, peak_three = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert [m.message_id for m in found] == [ids[250]]
    assert found[0].position == 250
    assert [m.message_id for m in first] == ids[:3]
    total = 400 * len(template.body + padding)  # 20 MB of bodies
    assert peak_one < total / 8, (peak_one, total)
    assert peak_three < total / 8, (peak_three, total)
    assert await order_of(world, world.dead) == ids


async def test_long_replay_takes_fresh_snapshots_and_keeps_order(world: World) -> None:
    """A replay longer than the hold budget returns its snapshot and takes another: same result, same order."""
    ids = await world.kill([OrderPlaced(id=f"o{i}") for i in range(6)], {"mail", "charge"})
    listeners = dict(await world.peek_listeners(world.dead))
    charge_ids = [i for i in ids if listeners[i] == "charge"]

    class CountingAdmin(DeadLetterAdmin):
        snapshots = 0

        def _snapshot(self, dead_queue: str, *args: Any) -> Any:
            self.snapshots += 1
            return super()._snapshot(dead_queue, *args)

    admin = CountingAdmin(world.settings, [world.queue], hold_seconds=0.05)
    async with admin:
        moved = await admin.replay(DeadFilter(listener="charge"), rate=40)
    assert admin.snapshots >= 3
    assert [m.message_id for m in moved] == charge_ids
    assert await world.peek(world.dead) == [i for i in ids if listeners[i] == "mail"]
    assert await world.settled(world.queue, 6) == 6
    assert await world.peek(world.queue) == charge_ids


async def test_replay_by_id_and_unknown_id(quorum_world: World) -> None:
    """Replaying named ids moves those; an unknown id among them exits 4 after moving the known ones."""
    world = quorum_world
    ids = await world.kill([OrderPlaced(id="x"), OrderPlaced(id="y")], {"mail"})
    result = await asyncio.to_thread(cli, world, "dead", "replay", ids[1], "missing-id")
    assert result.returncode == 4
    assert "missing-id" in result.stderr
    assert "replayed 1 dead letter" in result.stdout
    assert await order_of(world, world.dead) == [ids[0]]
    assert await world.settled(world.queue, 1) == 1
    usage = await asyncio.to_thread(cli, world, "dead", "replay")
    assert usage.returncode == 2


async def test_replay_dry_run_reports_what_would_fail_and_moves_nothing(quorum_world: World) -> None:
    """--dry-run with the app validates payloads: a bad body is reported as failing again; nothing moves."""
    world = quorum_world
    good = await world.kill([OrderPlaced(id="good")], {"mail"})
    # A letter whose body no longer matches the model (as if the event schema changed since).
    app = world.app()
    [entry] = [e for e in app.provider.listeners if e.id == "charge"]
    [out] = build_messages(OrderPlaced(id="bad"), [entry], body=b'{"identifier": 7}')
    FAILING.add("charge")
    try:
        outcome = await app.processor().process(
            IncomingMessage(queue=world.queue, body=out.body, headers=out.headers, message_id=out.message_id)
        )
    finally:
        FAILING.discard("charge")
    assert isinstance(outcome, DeadLetter)
    await world.publish_dead(outcome.message)

    result = await asyncio.to_thread(
        cli, world, "dead", "replay", "--all", "--dry-run", "--app", "test_dead_cli:create_app", "--json"
    )
    assert result.returncode == 1, result.stderr
    verdicts = {row["id"]: row for row in json_lines(result.stdout)}
    assert verdicts[good[0]]["would"] == "run"
    assert verdicts[out.message_id]["would"] == "fail"
    assert verdicts[out.message_id]["reason"] == "schema"
    assert await world.ready(world.dead) == 2
    assert await world.ready(world.queue) == 0
    no_app = await asyncio.to_thread(cli, world, "dead", "replay", "--all", "--dry-run")
    assert no_app.returncode == 2


async def test_sigkilled_replay_loses_nothing(world: World) -> None:
    """A replay SIGKILLed midway leaves every letter in Q.dead or Q: nothing lost, at most one duplicate."""
    ids = await world.kill([OrderPlaced(id=f"o{i}") for i in range(30)], {"mail"})
    assert len(ids) == 30
    script = Path(sys.executable).with_name("queueable")
    proc = subprocess.Popen(
        [str(script), "dead", "replay", "--all", "--rate", "20"],
        env=world.env,
        cwd=INTEGRATION_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while await world.ready(world.queue) < 8:
            assert time.monotonic() < deadline, "the replay did not start"
            await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    await asyncio.sleep(0.5)
    in_work = await world.drain(world.queue)
    in_dead = await world.drain(world.dead)
    seen = [m.message_id for m in in_work + in_dead]
    assert set(seen) == set(ids), "a dead letter was lost"
    assert len(seen) - len(set(seen)) <= 1
    assert 8 <= len(in_work) < 30


async def test_dead_commands_take_turns_on_one_queue(quorum_world: World) -> None:
    """While a replay holds Q.dead, list refuses (exit 1) instead of showing a queue that looks empty."""
    world = quorum_world
    ids = await world.kill([OrderPlaced(id=f"o{i}") for i in range(5)], {"mail"})
    script = Path(sys.executable).with_name("queueable")
    proc = subprocess.Popen(
        [str(script), "dead", "replay", "--all", "--rate", "2"],
        env=world.env,
        cwd=INTEGRATION_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while await world.ready(world.queue) < 1:
            assert time.monotonic() < deadline, "the replay did not start"
            await asyncio.sleep(0.05)
        busy = await asyncio.to_thread(cli, world, "dead", "list")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert busy.returncode == 1, busy.stderr
    assert busy.stderr.startswith(f"error: another `queueable dead` command is working on {world.dead}")
    await asyncio.sleep(0.3)
    after = await asyncio.to_thread(cli, world, "dead", "list", "--json")  # the lock died with the process
    assert after.returncode == 0, after.stderr
    listed = {row["id"] for row in json_lines(after.stdout)}
    assert listed | set(await world.peek(world.queue)) == set(ids)


# -- purge -----------------------------------------------------------------------------------------------------


async def test_purge_removes_only_what_matches_and_needs_yes(world: World) -> None:
    """purge without --yes refuses; with it, deletes only the matching letters, says how many, keeps order."""
    ids = await world.kill([OrderPlaced(id=f"o{i}") for i in range(3)] + [UserSignedUp(id="u")], {"mail", "crm"})
    refused = await asyncio.to_thread(cli, world, "dead", "purge", "--all", "--listener", "mail")
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert await world.ready(world.dead) == 4
    result = await asyncio.to_thread(cli, world, "dead", "purge", "--all", "--listener", "mail", "--yes")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("purged 3 dead letters")
    assert await order_of(world, world.dead) == [ids[3]]


# -- export / import -----------------------------------------------------------------------------------------


async def test_an_import_with_a_letter_amqp_cannot_carry_publishes_nothing(
    quorum_world: World, tmp_path: Path
) -> None:
    """A float header beyond float32's range (pamqp sends floats as float32) cannot be published: the import
    is refused with one line before anything goes out, so running it again (fixed) duplicates nothing.
    """
    world = quorum_world
    await world.kill([OrderPlaced(id="o1"), OrderPlaced(id="o2")], {"mail"})
    exported = tmp_path / "letters.jsonl"
    assert (await asyncio.to_thread(cli, world, "dead", "export", "-o", str(exported))).returncode == 0
    good, second = exported.read_text().splitlines()
    record = json.loads(second)
    record["headers"]["huge"] = 1e300
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + json.dumps(record) + "\n")
    refused = await asyncio.to_thread(cli, world, "dead", "import", str(bad))
    assert refused.returncode == 1, refused.stderr
    assert "letter 2" in refused.stderr
    assert "cannot be sent over AMQP" in refused.stderr
    assert "Traceback" not in refused.stderr
    # Headers over one frame (the broker's frame_max) would make it close the connection mid-import.
    record["headers"] = {**json.loads(second)["headers"], "blob": "y" * 200_000}
    bad.write_text(good + "\n" + json.dumps(record) + "\n")
    too_big = await asyncio.to_thread(cli, world, "dead", "import", str(bad))
    assert too_big.returncode == 1, too_big.stderr
    assert "more than one frame holds" in too_big.stderr
    # A letter for a dead-letter queue that does not exist: found before the first letter goes, too.
    elsewhere = {**json.loads(second), "queue": "nosuch.queue.dead"}
    bad.write_text(good + "\n" + json.dumps(elsewhere) + "\n")
    nowhere = await asyncio.to_thread(cli, world, "dead", "import", str(bad))
    assert nowhere.returncode == 4, nowhere.stderr
    assert "nosuch.queue.dead" in nowhere.stderr
    assert await world.settled(world.dead, 2) == 2  # the two letters already there, nothing imported


async def test_export_then_import_round_trips_byte_for_byte(quorum_world: World, tmp_path: Path) -> None:
    """Body, headers (every AMQP type, x-death included) and properties survive export, purge and import."""
    world = quorum_world
    await world.kill([OrderPlaced(id="o1")], {"mail"})
    # Headers of every type a table can hold, and a non-UTF-8 body.
    await world.channel.default_exchange.publish(
        aio_pika.Message(
            b"\xff\x00binary",
            headers={
                "s": "text",
                "i": 7,
                "big": 2**40,
                "f": 0.5,
                "b": True,
                "n": None,
                "raw": bytearray(b"\x00\xff"),
                "when": aio_pika.message.encode_timestamp(1_700_000_000),
                "dec": Decimal("1.25"),
                "list": [1, "two", {"three": 3}],
                "table": {"$bytes": "not a tag"},
            },
            message_id="exotic",
            correlation_id="corr-1",
            content_type="application/octet-stream",
            content_encoding="gzip",
            timestamp=1_700_000_001,
            type="custom.type",
            app_id="someapp",
            priority=3,
            # 8,388,603 ms: aio-pika writes int(seconds * 1000), and 8388.603 * 1000 falls just short of it.
            expiration=(8_388_603 + 0.5) / 1000,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=world.dead,
    )
    # A letter the broker dead-lettered itself (delivery limit 3: a worker "died" on it 4 times).
    await world.channel.default_exchange.publish(
        aio_pika.Message(b'{"id":"k"}', message_id="killer", delivery_mode=2), routing_key=world.queue
    )
    work = await world.channel.declare_queue(world.queue, passive=True)
    for _ in range(4):
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            message = await work.get(no_ack=False, fail=False)
        assert message is not None
        await message.nack(requeue=True)
    assert await world.settled(world.dead, 3) == 3

    async with world.admin() as admin:
        before = await admin.browse()
    killer = next(m for m in before if m.message_id == "killer")
    assert killer.reason == "delivery_limit"
    assert "x-death" in killer.headers

    first = tmp_path / "first.jsonl"
    exported = await asyncio.to_thread(cli, world, "dead", "export", "--output", str(first))
    assert exported.returncode == 0, exported.stderr
    assert "exported 3 dead letters" in exported.stderr
    assert len(first.read_text().splitlines()) == 3
    purged = await asyncio.to_thread(cli, world, "dead", "purge", "--all", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert await world.ready(world.dead) == 0
    imported = await asyncio.to_thread(cli, world, "dead", "import", str(first))
    assert imported.returncode == 0, imported.stderr
    assert await world.settled(world.dead, 3) == 3

    second = tmp_path / "second.jsonl"
    assert (await asyncio.to_thread(cli, world, "dead", "export", "-o", str(second))).returncode == 0
    assert second.read_bytes() == first.read_bytes()
    async with world.admin() as admin:
        after = await admin.browse()
    assert [(m.body, dict(m.headers), dict(m.properties)) for m in after] == [
        (m.body, dict(m.headers), dict(m.properties)) for m in before
    ]
    exotic = next(m for m in after if m.message_id == "exotic")
    assert exotic.headers["raw"] == b"\x00\xff"
    assert exotic.properties["expiration"] == 8_388_603  # import wrote 8388602 before

    assert exotic.headers["table"] == {"$bytes": "not a tag"}
    assert exotic.properties["timestamp"] == 1_700_000_001
    assert exotic.properties["correlation_id"] == "corr-1"


# -- status ----------------------------------------------------------------------------------------------------


async def test_status_reports_ready_and_consumers(quorum_world: World) -> None:
    """status shows the work and dead-letter queues with ready counts and consumers; unacked is n/a."""
    world = quorum_world
    await world.kill([OrderPlaced(id="o1")], {"mail", "charge"})
    consumer_channel = await world.connection.channel()
    work = await consumer_channel.declare_queue(world.queue, passive=True)

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        pass

    tag = await work.consume(ignore)
    try:
        result = await asyncio.to_thread(cli, world, "status", "--json")
    finally:
        await work.cancel(tag)
        await consumer_channel.close()
    assert result.returncode == 0, result.stderr
    rows = {row["queue"]: row for row in json_lines(result.stdout)}
    assert rows[world.dead] == {
        "queue": world.dead,
        "kind": "dead",
        "exists": True,
        "ready": 2,
        "unacked": None,
        "consumers": 0,
    }
    assert rows[world.queue]["consumers"] == 1
    assert rows[world.queue]["kind"] == "work"
    human = await asyncio.to_thread(cli, world, "status", "--queue", world.queue, "--queue", "absent")
    assert human.returncode == 0, human.stderr
    assert "missing" in human.stdout
    assert "2 dead letters" in human.stderr


async def test_status_finds_delay_queues(quorum_world: World) -> None:
    """A delay queue that holds a retry shows up in status with its ready count; absent buckets do not."""
    world = quorum_world
    transport = RabbitMQTransport(world.settings, queues=[world.queue])
    try:
        await transport.publish_retry(
            OutgoingMessage(queue=world.queue, body=b"{}", headers={H_LISTENER: "mail"}), 60
        )
    finally:
        await transport.close()
    try:
        result = await asyncio.to_thread(cli, world, "status", "--json")
        assert result.returncode == 0, result.stderr
        rows = json_lines(result.stdout)
        assert [row["queue"] for row in rows] == [world.queue, world.dead, world.queue + ".delay.64000"]
        assert rows[2]["kind"] == "delay"
        assert rows[2]["ready"] == 1
    finally:
        channel = await world.connection.channel()
        await channel.queue_delete(world.queue + ".delay.64000")
        await channel.close()


#: The real management API of the test broker (``.ci/run`` enables the plugin on the local one).
MANAGEMENT_URL = os.environ.get("QUEUEABLE_TEST_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672")


def require_management_api() -> urllib.parse.SplitResult:
    """The test broker's management API, or a failure that says how to enable it (never a skip)."""
    management = urllib.parse.urlsplit(MANAGEMENT_URL)
    try:
        socket.create_connection((management.hostname, management.port or 15672), timeout=2).close()
    except OSError as exc:
        pytest.fail(
            f"RabbitMQ's management API at {management.hostname}:{management.port} does not answer ({exc}): "
            "rabbitmq-plugins enable rabbitmq_management, or set QUEUEABLE_TEST_MANAGEMENT_URL",
            pytrace=False,
        )
    return management


def management_request(method: str, path: str, body: dict[str, Any] | None = None) -> None:
    """One call to the test broker's management API (policies)."""
    management = require_management_api()
    base = f"{management.scheme}://{management.hostname}:{management.port or 15672}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)  # noqa: S310 - the test's own URL
    request.add_header("Content-Type", "application/json")
    user, password = management.username or "guest", management.password or "guest"
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - the test's own URL
        pass


async def test_status_warns_when_a_delivery_limit_could_drop_dead_letters(quorum_world: World) -> None:
    """Against the real management API: a quorum dead-letter queue without a limit (RabbitMQ 3.x) draws no
    warning; once a policy gives it one, ``status`` warns on stderr (reading it would drop its dead letters),
    and its JSON on stdout stays as it was.
    """
    world = quorum_world
    require_management_api()
    await world.kill([OrderPlaced(id="o1")], {"mail"})
    clean = await asyncio.to_thread(cli, world, "status", "--json", "--management-url", MANAGEMENT_URL)
    assert clean.returncode == 0, clean.stderr
    assert "warning:" not in clean.stderr
    policy = f"/api/policies/%2F/{urllib.parse.quote(world.dead, safe='')}"
    management_request(
        "PUT",
        policy,
        {"pattern": f"^{re.escape(world.dead)}$", "definition": {"delivery-limit": 2}, "apply-to": "queues"},
    )
    try:
        warned = clean
        for _ in range(60):  # the management API shows the effective policy after its next refresh
            warned = await asyncio.to_thread(cli, world, "status", "--json", "--management-url", MANAGEMENT_URL)
            if "warning:" in warned.stderr:
                break
            await asyncio.sleep(0.5)
        assert warned.returncode == 0, warned.stderr
        assert f"warning: {world.dead} has a delivery limit of 2 (from a policy)" in warned.stderr
        assert [row["queue"] for row in json_lines(warned.stdout)] == [
            row["queue"] for row in json_lines(clean.stdout)
        ]
    finally:
        management_request("DELETE", policy)


async def test_status_with_the_management_api_adds_unacked_counts_and_delay_queues(quorum_world: World) -> None:
    """Against RabbitMQ's real management API: unacked counts of a consumer holding deliveries, and the delay
    queue listed without probing the ladder. (Its statistics lag by up to the collection interval: poll.)
    """
    world = quorum_world
    require_management_api()
    await world.kill([OrderPlaced(id="o1")], {"mail", "charge"})
    transport = RabbitMQTransport(world.settings, queues=[world.queue])
    try:
        await transport.publish(
            [OutgoingMessage(queue=world.queue, body=b"{}", headers={H_LISTENER: "mail"}) for _ in range(3)]
        )
        await transport.publish_retry(
            OutgoingMessage(queue=world.queue, body=b"{}", headers={H_LISTENER: "mail"}), 60
        )
    finally:
        await transport.close()
    holder = await world.connection.channel()
    await holder.set_qos(prefetch_count=2)
    work = await holder.declare_queue(world.queue, passive=True)

    async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        pass  # never acked: the broker counts them unacked

    tag = await work.consume(hold)
    try:
        rows: dict[str, dict[str, Any]] = {}
        for _ in range(60):  # the management API's statistics refresh every few seconds
            result = await asyncio.to_thread(cli, world, "status", "--json", "--management-url", MANAGEMENT_URL)
            assert result.returncode == 0, result.stderr
            rows = {row["queue"]: row for row in json_lines(result.stdout)}
            if rows.get(world.queue, {}).get("unacked") == 2 and world.queue + ".delay.64000" in rows:
                break
            await asyncio.sleep(0.5)
        assert rows[world.queue]["unacked"] == 2  # the consumer's prefetch, held
        assert rows[world.queue]["consumers"] == 1
        assert rows[world.queue]["ready"] >= 1
        assert rows[world.dead]["ready"] == 2
        assert rows[world.dead]["unacked"] == 0
        assert rows[world.queue + ".delay.64000"]["kind"] == "delay"
        assert rows[world.queue + ".delay.64000"]["ready"] == 1
    finally:
        await work.cancel(tag)
        await holder.close()
        channel = await world.connection.channel()
        await channel.queue_delete(world.queue + ".delay.64000")
        await channel.close()


async def test_missing_queues_and_files_exit_4(quorum_world: World, tmp_path: Path) -> None:
    """A dead-letter queue that does not exist, or an import file that does not, is 'not found' (exit 4)."""
    world = quorum_world
    listed = await asyncio.to_thread(cli, world, "dead", "list", "--queue", world.queue + ".nosuch")
    assert listed.returncode == 4
    assert "does not exist" in listed.stderr
    export = tmp_path / "one.jsonl"
    await world.kill([UserSignedUp(id="u")], {"crm"})
    assert (await asyncio.to_thread(cli, world, "dead", "export", "-o", str(export))).returncode == 0
    into_nothing = await asyncio.to_thread(cli, world, "dead", "import", str(export), "--queue", "nosuch.queue")
    assert into_nothing.returncode == 4
    assert "nosuch.queue.dead" in into_nothing.stderr
    no_file = await asyncio.to_thread(cli, world, "dead", "import", str(tmp_path / "absent.jsonl"))
    assert no_file.returncode in (2, 4)
    assert await world.ready(world.dead) == 1


async def test_replaying_a_broker_dead_letter_removes_x_death(quorum_world: World) -> None:
    """A letter the broker dead-lettered (delivery limit) is replayed to its queue without x-death."""
    world = quorum_world
    await world.channel.default_exchange.publish(
        aio_pika.Message(b'{"id":"k"}', message_id="killer", headers={H_LISTENER: "crm"}, delivery_mode=2),
        routing_key=world.queue,
    )
    work = await world.channel.declare_queue(world.queue, passive=True)
    for _ in range(4):
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            message = await work.get(no_ack=False, fail=False)
        assert message is not None
        await message.nack(requeue=True)
    assert await world.settled(world.dead, 1) == 1
    listed = json_lines((await asyncio.to_thread(cli, world, "dead", "list", "--json")).stdout)
    assert [(row["id"], row["reason"], row["original_queue"]) for row in listed] == [
        ("killer", "delivery_limit", world.queue)
    ]
    result = await asyncio.to_thread(cli, world, "dead", "replay", "killer")
    assert result.returncode == 0, result.stderr
    assert await world.settled(world.queue, 1) == 1
    [copy] = await world.drain(world.queue)
    headers = dict(copy.headers or {})
    assert "x-death" not in headers
    assert headers[H_REPLAYS] == 1
    assert headers[H_LISTENER] == "crm"


async def test_list_warns_about_consumers_on_the_dead_letter_queue(quorum_world: World) -> None:
    """Someone consuming Q.dead competes with the browse: list says so on stderr."""
    world = quorum_world
    channel = await world.connection.channel()
    dead = await channel.declare_queue(world.dead, passive=True)

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        pass

    tag = await dead.consume(ignore)
    try:
        result = await asyncio.to_thread(cli, world, "dead", "list")
    finally:
        await dead.cancel(tag)
        await channel.close()
    assert result.returncode == 0, result.stderr
    assert f"warning: {world.dead} has 1 consumer(s)" in result.stderr


async def test_admin_replay_stops_on_an_unroutable_queue(quorum_world: World) -> None:
    """A replay whose work queue is gone fails with PublishError and leaves the letter in Q.dead."""
    world = quorum_world
    [dead_id] = await world.kill([UserSignedUp(id="u")], {"crm"})
    work = await world.channel.declare_queue(world.queue, passive=True)
    await work.unbind(world.exchange, routing_key=world.queue)
    from queueable.errors import PublishError  # noqa: PLC0415

    async with world.admin() as admin:
        with pytest.raises(PublishError, match="not confirmed"):
            await admin.replay(DeadFilter())
    assert await order_of(world, world.dead) == [dead_id]
    assert await world.ready(world.queue) == 0


async def test_a_command_cancelled_while_reading_gives_the_letters_back_in_order(quorum_world: World) -> None:
    """Ctrl-C while the snapshot is read: a basic.get cut off closed the channel, and the broker requeued every
    held letter in its own order (a quorum queue's order lost, and a traceback). The read now finishes, every
    letter goes back in order, and then the cancellation propagates.
    """
    world = quorum_world
    ids = await world.kill([OrderPlaced(id=f"o{i}") for i in range(30)], {"mail"})  # peek keeps 30 in order
    before = await world.peek(world.dead)
    assert sorted(before) == sorted(ids)

    async with world.admin() as admin:
        browsing = asyncio.create_task(admin.browse())
        while await world.ready(world.dead) > 25:  # some letters held, most still to read
            await asyncio.sleep(0.001)
        browsing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await browsing
    assert await world.settled(world.dead, 30) == 30
    assert await order_of(world, world.dead) == before


async def test_letters_go_back_at_once_when_the_queue_does_not_show_them(
    quorum_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the ready count never shows a returned chunk (something consumes the queue), the rest goes back at
    once with a warning: every letter is still there.
    """
    world = quorum_world
    ids = await world.kill([OrderPlaced(id=f"o{i}") for i in range(40)], {"mail", "charge"})
    assert len(ids) == 80

    async def never(*_: Any) -> int | None:
        return None

    monkeypatch.setattr("queueable._deadletters._until_ready", never)
    async with world.admin() as admin:
        found = await admin.browse(DeadFilter(listener="charge"))
        warnings = list(admin.warnings)
    assert len(found) == 40
    assert any("went back at once" in warning for warning in warnings), warnings
    assert await world.settled(world.dead, 80) == 80
    assert sorted(await world.peek(world.dead)) == sorted(ids)  # all back; their order is the broker's


async def test_letters_arriving_while_a_snapshot_goes_back_are_reported(
    quorum_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Letters dead-lettered while the others go back can fool the ready count: the command says so."""
    world = quorum_world
    ids = await world.kill([OrderPlaced(id=f"o{i}") for i in range(40)], {"mail", "charge"})
    real = _deadletters._until_ready
    arrived: list[str] = []

    async def with_arrivals(channel: Any, queue: str, count: int, timeout: float) -> int | None:
        if not arrived:  # a worker dead-letters five more right after the first chunk went back
            for n in range(5):
                arrived.append(f"late-{n}")
                await world.channel.default_exchange.publish(
                    aio_pika.Message(b"{}", message_id=arrived[-1]), routing_key=world.dead
                )
        return await real(channel, queue, count, timeout)

    monkeypatch.setattr(_deadletters, "_until_ready", with_arrivals)
    async with world.admin() as admin:
        await admin.browse()
        warnings = list(admin.warnings)
    assert any("5 letter(s) arrived" in warning for warning in warnings), warnings
    assert await world.settled(world.dead, 85) == 85
    assert sorted(await world.peek(world.dead)) == sorted([*ids, *arrived])
