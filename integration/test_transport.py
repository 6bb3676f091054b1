"""RabbitMQTransport against the real broker: confirms, mandatory routing, topology, delay queues, failures."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING

import aio_pika
import aiormq
import aiormq.exceptions
import pytest
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from pydantic import BaseModel

from queueable import App, ConfigurationError, OutgoingMessage, PublishError, Settings, TransportClosedError
from queueable._wire import H_LISTENER
from queueable.transport.rabbitmq import (
    DELAY_QUEUE_GRACE_MS,
    RabbitMQTransport,
    _publish_batch,
    _Shortcut,
    dead_reason_of,
    delay_bucket_ms,
    delay_queue_for,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


@pytest.fixture(name="settings")
def fixture_settings(amqp_url: str, unique: str) -> Settings:
    """Settings with a private exchange and default queue for this test."""
    return Settings(url=amqp_url, exchange=unique, default_queue=unique, publish_timeout=5.0)


@pytest.fixture(name="transport")
async def fixture_transport(
    settings: Settings, unique: str, admin: aio_pika.abc.AbstractConnection
) -> AsyncIterator[RabbitMQTransport]:
    """A transport for this test's queue, closed afterwards (``admin`` then deletes what it declared)."""
    transport = RabbitMQTransport(settings, queues=[unique])
    yield transport
    await transport.close()


def message(queue: str, body: bytes = b'{"n": 1}', **headers: object) -> OutgoingMessage:
    """An outgoing message for ``queue`` with a listener header."""
    return OutgoingMessage(queue=queue, body=body, headers={H_LISTENER: "tests:listener", **headers})


async def drain(connection: aio_pika.abc.AbstractConnection, queue: str, *, timeout: float = 5.0) -> list:
    """Every message currently in ``queue`` (acked), waiting up to ``timeout`` for the first one."""
    channel = await connection.channel()
    declared = await channel.declare_queue(queue, passive=True)
    got = []
    deadline = time.monotonic() + timeout
    while True:
        incoming = await declared.get(fail=False, no_ack=True)
        if incoming is not None:
            got.append(incoming)
            continue
        if got or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    await channel.close()
    return got


async def test_publish_returns_after_confirm_and_message_is_persistent(transport, admin, unique):
    """A published message is in the work queue, persistent, with its id, headers and content type."""
    sent = message(unique, extra="value")
    await transport.publish([sent])
    [got] = await drain(admin, unique)
    assert got.body == sent.body
    assert got.message_id == sent.message_id
    assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert got.content_type == "application/json"
    assert got.headers["extra"] == "value"
    assert got.headers[H_LISTENER] == "tests:listener"
    assert abs(got.timestamp.timestamp() - sent.timestamp) < 1.5


async def test_publish_many_concurrently_all_confirmed(transport, admin, unique):
    """A hundred messages published in one call are all in the queue when publish returns."""
    sent = [message(unique, body=b'{"n": %d}' % i) for i in range(100)]
    started = time.perf_counter()
    await transport.publish(sent)
    elapsed = time.perf_counter() - started
    got = await drain(admin, unique)
    assert sorted(m.message_id for m in got) == sorted(m.message_id for m in sent)
    assert elapsed < 3.0  # concurrent: far below 100 sequential confirm round trips on a slow broker
    assert _Shortcut.on(transport._underlay).confirmed >= 1  # confirms resolved at the connection's reader


async def test_unroutable_message_raises_publish_error(transport, unique):
    """A message for a queue nobody declared is an error at the emitter, naming the message."""
    lost = message(unique + ".nowhere")
    with pytest.raises(PublishError, match="unroutable") as caught:
        await transport.publish([lost])
    assert caught.value.message_ids == [lost.message_id]


async def test_mixed_batch_reports_only_the_unroutable(transport, admin, unique):
    """In a batch with one unroutable message, the others are confirmed and the error names only that one.

    Twenty times, the unroutable one at every place in the batch: the broker's basic.return must reach aiormq
    before the ack of the same publish, however the reader takes the frames.
    """
    sent = []
    for round_ in range(20):
        good = [message(unique) for _ in range(3)]
        bad = message(unique + ".nowhere")
        batch = [*good]
        batch.insert(round_ % 4, bad)
        with pytest.raises(PublishError) as caught:
            await transport.publish(batch)
        assert caught.value.message_ids == [bad.message_id]
        sent += good
    got = await drain(admin, unique)
    assert sorted(m.message_id for m in got) == sorted(m.message_id for m in sent)
    underlay = transport._underlay  # nothing of the batches stays behind in aiormq's channel
    assert underlay.message_id_delivery_tag == {}
    assert underlay.confirmations == {}


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (Basic.Nack, Basic.Ack, {2: "DeliveryError", 3: "DeliveryError", 4: "ack"}),  # a nack is never an ack
        (Basic.Ack, Basic.Nack, {2: "ack", 3: "ack", 4: "DeliveryError"}),  # nor an ack a nack (a duplicate)
    ],
)
async def test_confirms_keep_their_order_between_aiormqs_reader_and_the_shortcut(
    amqp_url, first, second, expected
):
    """On a real aiormq channel: a return and a multiple confirm that queue up for aiormq's reader, then a
    multiple confirm that the shortcut takes. Each publish gets the outcome the broker gave it, as on aiormq's
    own path (aiormq resolves a multiple confirm a loop iteration later; the later confirm must not overtake it).
    """
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        _Shortcut.on(channel)
        futures = {tag: channel.create_future() for tag in range(1, 5)}
        channel.confirmations.update(futures)
        channel.message_id_delivery_tag["m1"] = 1
        put = channel.frames.put  # what the connection's reader calls with each frame
        await put((0, Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="x", routing_key="k")))
        await put((0, ContentHeader(body_size=0, properties=Basic.Properties(message_id="m1"))))
        await put((0, first(delivery_tag=3, multiple=True)))  # behind the return: aiormq's reader takes it
        await asyncio.sleep(0)  # the connection's reader waits for the next read; aiormq's reader runs
        await put((0, second(delivery_tag=4, multiple=True)))
        await asyncio.sleep(0.05)
        outcome = {
            tag: "ack" if future.exception() is None else type(future.exception()).__name__
            for tag, future in futures.items()
        }
        assert outcome == {1: "PublishError", **expected}
        assert channel.confirmations == {}
    finally:
        await connection.close()


async def test_rejected_and_unroutable_publishes_are_never_reported_confirmed(transport, admin, unique):
    """Batches mixing unroutable messages (return, then ack), messages a full queue rejects (nack) and routable
    ones, back to back for two seconds: every publish is reported as the broker answered it.
    """
    await transport.connect()  # declares the exchange and the work queue
    channel = await admin.channel()
    full = await channel.declare_queue(
        unique + ".other", arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    await full.bind(unique, unique + ".other")
    underlay = await transport._fresh_underlay()
    kinds = (unique + ".nowhere", unique + ".other", unique, unique + ".other", unique, unique + ".other")
    deadline = time.monotonic() + 2.0
    rounds = 0
    while time.monotonic() < deadline:
        batch = [message(kinds[i % len(kinds)]) for i in range(12)]
        results = await _publish_batch(underlay, unique, None, batch)
        for sent, result in zip(batch, results, strict=True):
            if sent.queue == unique:
                assert result is None
            elif sent.queue.endswith(".nowhere"):
                assert isinstance(result, aiormq.exceptions.PublishError)
            else:
                assert isinstance(result, aiormq.exceptions.DeliveryError), f"round {rounds}: {result!r}"
        rounds += 1
    assert rounds > 50
    await asyncio.sleep(0)  # the last confirmations' done-callbacks (which forget their message ids) run
    assert underlay.confirmations == {}
    assert underlay.message_id_delivery_tag == {}


async def test_topology_declare_is_idempotent(transport, admin, unique):
    """Declaring twice is fine and yields the work queue, its dead-letter queue and bindings."""
    first = await transport.declare_topology()
    second = await transport.declare_topology()
    assert [s.name for s in first] == [unique, unique + ".dead"] == [s.name for s in second]
    assert first[0].arguments["x-queue-type"] == "quorum"
    assert first[0].arguments["x-delivery-limit"] == 20
    assert first[0].arguments["x-dead-letter-routing-key"] == unique + ".dead"
    # The dead-letter queue is bound to the exchange: a message for it is routable.
    await transport.publish([message(unique + ".dead")])
    assert len(await drain(admin, unique + ".dead")) == 1


async def test_declare_conflicting_queue_type_is_configuration_error(transport, settings, unique):
    """A queue that exists as quorum cannot be declared classic: a clear ConfigurationError, not a hang."""
    await transport.declare_topology()
    classic = RabbitMQTransport(settings.merged(queue_type="classic"), queues=[unique])
    try:
        with pytest.raises(ConfigurationError, match=unique):
            await classic.declare_topology()
        # Publishing first declares the topology, so it reports the same conflict.
        with pytest.raises(ConfigurationError):
            await classic.publish([message(unique)])
    finally:
        await classic.close()


async def test_classic_topology(amqp_url, admin, unique):
    """queue_type='classic' declares classic queues without a delivery limit, and publishing works."""
    settings = Settings(url=amqp_url, exchange=unique, default_queue=unique, queue_type="classic")
    transport = RabbitMQTransport(settings, queues=[unique])
    try:
        specs = await transport.declare_topology()
        assert specs[0].arguments["x-queue-type"] == "classic"
        assert "x-delivery-limit" not in specs[0].arguments
        await transport.publish([message(unique)])
        assert len(await drain(admin, unique)) == 1
    finally:
        await transport.close()


async def test_retry_goes_through_delay_queue(transport, admin, unique):
    """publish_retry parks the message in Q.delay.<ms> and it reaches Q after the delay, not before."""
    await transport.connect()
    sent = message(unique)
    started = time.monotonic()
    await transport.publish_retry(sent, 0.3)
    channel = await admin.channel()
    queue = await channel.declare_queue(unique, passive=True)
    assert await queue.get(fail=False) is None  # not yet
    [got] = await drain(admin, unique)
    elapsed = time.monotonic() - started
    assert got.message_id == sent.message_id
    assert 0.3 <= elapsed < 3.0
    death = got.headers["x-death"][0]
    assert death["queue"] == delay_queue_for(unique, delay_bucket_ms(0.3))
    assert death["reason"] == "expired"


async def test_short_retry_is_not_blocked_behind_long_one(transport, admin, unique):
    """A 0.3 s retry published after a 0.6 s one arrives first (one queue per delay bucket)."""
    await transport.connect()
    slow, fast = message(unique, body=b'"slow"'), message(unique, body=b'"fast"')
    await transport.publish_retry(slow, 0.6)
    await transport.publish_retry(fast, 0.3)
    channel = await admin.channel()
    queue = await channel.declare_queue(unique, passive=True)
    order = []
    deadline = time.monotonic() + 5
    while len(order) < 2 and time.monotonic() < deadline:
        got = await queue.get(fail=False, no_ack=True)
        if got is None:
            await asyncio.sleep(0.02)
        else:
            order.append(got.body)
    assert order == [b'"fast"', b'"slow"']


async def test_delay_queue_recreated_when_deleted(transport, admin, unique):
    """A delay queue deleted behind the transport's back is declared again on the next retry."""
    await transport.connect()
    await transport.publish_retry(message(unique), 0.3)
    assert len(await drain(admin, unique)) == 1
    channel = await admin.channel()
    await channel.queue_delete(delay_queue_for(unique, delay_bucket_ms(0.3)))
    await transport.publish_retry(message(unique), 0.3)
    assert len(await drain(admin, unique)) == 1


async def test_delay_queue_arguments(transport, admin, unique):
    """The delay queue expires unused, with a lease longer than its TTL (a parked message is never lost)."""
    await transport.connect()
    await transport.publish_retry(message(unique), 0.5)
    channel = await admin.channel()
    # Same arguments: a no-op redeclare; different x-expires would fail with PRECONDITION_FAILED.
    await channel.declare_queue(
        delay_queue_for(unique, 500),
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-message-ttl": 500,
            "x-expires": 500 + DELAY_QUEUE_GRACE_MS,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": unique,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    assert len(await drain(admin, unique)) == 1


async def test_unreachable_broker_raises_publish_error_within_timeout(unique):
    """With nothing listening, publish raises PublishError after the timeout instead of reporting success."""
    settings = Settings(
        url="amqp://guest:guest@127.0.0.1:1/", default_queue=unique, publish_timeout=1.0, connect_timeout=0.5
    )
    transport = RabbitMQTransport(settings, queues=[unique])
    started = time.monotonic()
    with pytest.raises(PublishError) as caught:
        await transport.publish([message(unique)])
    assert time.monotonic() - started < 3.0
    assert caught.value.message_ids
    await transport.close()


async def test_password_never_in_errors_or_repr(amqp_url, unique):
    """A refused login names the masked URL; the password is in no message, cause or repr."""
    secret = "s3cr3t-pw-xyz"  # noqa: S105 - a wrong password on purpose
    url = amqp_url.replace("guest:guest@", f"guest:{secret}@")
    transport = RabbitMQTransport(Settings(url=url, default_queue=unique, publish_timeout=5), queues=[unique])
    assert secret not in repr(transport)
    assert "guest:***@" in repr(transport)
    with pytest.raises(PublishError) as caught:
        await transport.publish([message(unique)])
    error: BaseException | None = caught.value
    while error is not None:
        assert secret not in str(error)
        assert secret not in repr(error.args)
        error = error.__cause__ or error.__context__
    await transport.close()


async def test_a_virtual_host_that_does_not_exist_is_named(amqp_url, unique):
    """RabbitMQ closes the connection at open for an unknown vhost; aiormq reports a bare InvalidFrameError.
    Publisher and dead-letter admin both say which vhost (the publisher after retrying within its timeout, as
    for an unreachable broker: a vhost can be down for a moment while a node starts).
    """
    from queueable.deadletters import DeadLetterAdmin  # noqa: PLC0415

    url = amqp_url.rstrip("/") + f"/{unique}-no-such-vhost"
    settings = Settings(url=url, default_queue=unique, publish_timeout=3, connect_timeout=1)
    transport = RabbitMQTransport(settings, queues=[unique])
    with pytest.raises(PublishError, match=f"the virtual host '{unique}-no-such-vhost' does not exist"):
        await transport.publish([message(unique)])
    await transport.close()
    with pytest.raises(ConnectionRefusedError, match=f"the virtual host '{unique}-no-such-vhost' does not exist"):
        async with DeadLetterAdmin(settings, [unique]):
            pass


async def test_a_return_fails_its_own_publish_when_another_shares_its_message_id(transport, admin, unique):
    """Copies keep their original's message id, and at-least-once delivery makes duplicates, so two unconfirmed
    publishes of one id can meet on the channel. aiormq matches a basic.return by message id: the unroutable
    one passed as confirmed (lost) and the routed one failed. Now the second waits for the first's confirm.
    """
    from dataclasses import replace  # noqa: PLC0415

    nowhere = replace(message(f"{unique}.nowhere"), message_id=uuid.uuid4().hex)
    routed = replace(message(unique), message_id=nowhere.message_id)
    await transport.connect()
    both = (transport.publish([nowhere]), transport.publish([routed]))
    results = await asyncio.gather(*both, return_exceptions=True)
    assert isinstance(results[0], PublishError)
    assert "unroutable" in str(results[0])
    assert results[1] is None
    [got] = await drain(admin, unique)
    assert got.message_id == routed.message_id


async def test_closed_transport_refuses_to_publish(transport, unique):
    """After close(), publish raises TransportClosedError."""
    await transport.publish([message(unique)])
    await transport.close()
    with pytest.raises(TransportClosedError):
        await transport.publish([message(unique)])


async def test_delivery_limit_dead_letters_are_recognisable(amqp_url, admin, unique):
    """A message the broker dead-lettered for its delivery limit is reported as DELIVERY_LIMIT."""
    settings = Settings(url=amqp_url, exchange=unique, default_queue=unique, delivery_limit=2)
    transport = RabbitMQTransport(settings, queues=[unique])
    try:
        await transport.publish([message(unique)])
        channel = await admin.channel()
        queue = await channel.declare_queue(unique, passive=True)
        for _ in range(3):  # delivered, requeued 3 times: over the limit of 2 redeliveries
            got = None
            deadline = time.monotonic() + 5
            while got is None and time.monotonic() < deadline:
                got = await queue.get(fail=False)
                if got is None:
                    await asyncio.sleep(0.05)
            assert got is not None
            await got.nack(requeue=True)
        [dead] = await drain(admin, unique + ".dead")
        assert dead_reason_of(dead.headers) == "delivery_limit"
    finally:
        await transport.close()


def test_topology_command_declares_and_reports(amqp_url, admin, unique):
    """`queueable topology declare --json` declares twice without error and prints what it declared."""
    from click.testing import CliRunner  # noqa: PLC0415 - only this test needs click

    from queueable.cli.topology import topology  # noqa: PLC0415

    env = {"QUEUEABLE_URL": amqp_url, "QUEUEABLE_QUEUE": unique, "QUEUEABLE_EXCHANGE": unique}
    runner = CliRunner()
    for _ in range(2):
        result = runner.invoke(topology, ["declare", "--json"], env=env)
        assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines[0] == {"exchange": unique, "type": "direct", "durable": True}
    assert [line["queue"] for line in lines[1:]] == [unique, unique + ".dead"]
    assert "guest:guest" not in result.output
    conflicting = runner.invoke(topology, ["declare"], env={**env, "QUEUEABLE_QUEUE_TYPE": "classic"})
    assert conflicting.exit_code == 5
    assert "already exists with other arguments" in conflicting.output


@pytest.fixture(name="own_node")
def fixture_own_node(tmp_path):
    """A private node of this test's own (the session's one may be recovering from crash tests)."""
    from _rabbit_node import RabbitNode  # noqa: PLC0415 - only the slow test needs it

    node = RabbitNode(tmp_path / "rabbit")
    node.start()
    yield node
    node.cleanup()


@pytest.mark.slow
async def test_publish_across_a_broker_outage(own_node, unique):
    """On a private node: while it is down, publish raises PublishError after its timeout (never a false
    success); a publish started during the outage completes once the node is back, and the message is there.
    """
    rabbit_node = own_node
    settings = Settings(url=rabbit_node.url, exchange=unique, default_queue=unique, publish_timeout=1.5)
    transport = RabbitMQTransport(settings, queues=[unique])
    patient = RabbitMQTransport(settings.merged(publish_timeout=60.0), queues=[unique])
    try:
        await patient.publish([message(unique)])
        await transport.publish([message(unique)])
        await asyncio.to_thread(rabbit_node.stop)
        started = time.monotonic()
        with pytest.raises(PublishError, match="not confirmed within"):
            await transport.publish([message(unique)])
        assert 1.4 < time.monotonic() - started < 4
        waiting = message(unique)
        pending = asyncio.create_task(patient.publish([waiting]))
        await asyncio.sleep(0.5)
        assert not pending.done()
        await asyncio.to_thread(rabbit_node.start)
        await asyncio.wait_for(pending, 60)
        connection = await aio_pika.connect(rabbit_node.url)
        try:
            got = await drain(connection, unique)
            assert waiting.message_id in {m.message_id for m in got}
        finally:
            await connection.close()
    finally:
        await transport.close()
        await patient.close()


async def test_nacked_message_is_retried_then_reported(amqp_url, admin, unique):
    """A message the broker nacks (a full reject-publish queue) is retried until the publish timeout, then
    PublishError names the nack; it never counts as published.
    """
    settings = Settings(url=amqp_url, exchange=unique, default_queue=unique, publish_timeout=1.0)
    transport = RabbitMQTransport(settings, queues=[unique])
    try:
        await transport.connect()
        channel = await admin.channel()
        full = await channel.declare_queue(
            unique + ".other", arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await full.bind(unique, unique + ".other")
        started = time.monotonic()
        with pytest.raises(PublishError, match=r"not confirmed within 1 s.*Nack"):
            await transport.publish([message(unique + ".other")])
        assert 0.9 < time.monotonic() - started < 3
    finally:
        await transport.close()


async def test_a_queue_registered_after_the_first_publish_is_declared_before_its_first_message(
    settings, admin, unique
):
    """An app that registers a listener with a new queue_name after it started publishing can publish to it:
    the transport declares the new queue's topology first (it used to fail as unroutable).
    """

    class Early(BaseModel):
        n: int

    class Late(BaseModel):
        n: int

    async def noop(event: BaseModel) -> None: ...

    app = App(settings=settings)
    app.add_listener(noop, Early, queue=True, id="tests:early")
    try:
        await app.dispatch(Early(n=1))  # the transport exists now, and declared only `unique`
        app.add_listener(noop, Late, queue=True, id="tests:late", queue_name=unique + ".other")
        await app.dispatch(Late(n=2))
        [late] = await drain(admin, unique + ".other")
        assert json.loads(late.body) == {"n": 2}
        channel = await admin.channel()
        await channel.declare_queue(unique + ".other.dead", passive=True)  # its dead-letter queue exists too
    finally:
        await app.close()


async def test_a_run_time_queue_that_conflicts_fails_alone(settings, admin, unique):
    """A queue registered at run time that exists with other arguments: its messages fail with PublishError,
    and publishing to the app's other queues goes on (it used to make every publish raise).
    """

    class Early(BaseModel):
        n: int

    class Late(BaseModel):
        n: int

    async def noop(event: BaseModel) -> None: ...

    channel = await admin.channel()
    await channel.declare_queue(unique + ".other", durable=True, arguments={"x-queue-type": "classic"})
    app = App(settings=settings)
    app.add_listener(noop, Early, queue=True, id="tests:early")
    try:
        await app.dispatch(Early(n=1))
        app.add_listener(noop, Late, queue=True, id="tests:late", queue_name=unique + ".other")
        with pytest.raises(PublishError):
            await app.dispatch(Late(n=2))
        await app.dispatch(Early(n=3))
        assert [json.loads(m.body)["n"] for m in await drain(admin, unique)] == [1, 3]
    finally:
        await app.close()
