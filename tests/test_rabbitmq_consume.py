"""The RabbitMQ transport's consumer side, no broker: aiormq deliveries, the consumer swap, acks per channel."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from queueable import Settings
from queueable.transport.rabbitmq import (
    AckCoalescer,
    RabbitMQTransport,
    _Consumer,
    delivered_to_incoming,
    to_incoming,
)


class FakeChannel:
    """Stands in for an aiormq channel: a consumer table, an open/closed flag, and the ack frames written."""

    def __init__(self) -> None:
        self.consumers: dict[str, Any] = {}
        self.is_closed = False
        self.frames: list[tuple[str, int]] = []

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.frames.append(("ack", tag))

    async def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True) -> None:
        self.frames.append(("nack", tag))


def delivery(channel: Any, tag: int, *, headers: dict[str, Any] | None = None, **props: Any) -> DeliveredMessage:
    """What aiormq hands a consumer callback: the deliver frame, the decoded content header, the body."""
    frame = Basic.Deliver(consumer_tag="ctag", delivery_tag=tag, redelivered=tag % 2 == 0, routing_key="q")
    header = ContentHeader(body_size=2, properties=Basic.Properties(headers=headers, **props))
    return DeliveredMessage(delivery=frame, header=header, body=b"{}", channel=channel)


@pytest.fixture(name="transport")
def fixture_transport() -> RabbitMQTransport:
    return RabbitMQTransport(Settings(url="amqp://guest:guest@127.0.0.1:5672/"), queues=["q"])


def test_delivered_to_incoming_reads_pamqp_properties():
    """An aiormq delivery becomes the same IncomingMessage that aio-pika's message of it would."""
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    message = delivery(
        FakeChannel(),
        2,
        headers={"x-queueable-listener": "a:b"},
        message_id="m1",
        correlation_id="c1",
        timestamp=stamp,
        content_type="application/json",
        content_encoding="identity",
        message_type="ev",
    )
    incoming = delivered_to_incoming(message, "mail")
    assert incoming.headers is message.header.properties.headers  # not copied
    assert incoming.timestamp == 1_767_225_600.0
    assert incoming.redelivered is True
    expected = to_incoming(
        SimpleNamespace(  # type: ignore[arg-type]
            body=b"{}",
            headers={"x-queueable-listener": "a:b"},
            message_id="m1",
            correlation_id="c1",
            timestamp=stamp,
            content_type="application/json",
            content_encoding="identity",
            type="ev",
            redelivered=True,
        ),
        "mail",
    )
    assert incoming == expected


def test_delivered_to_incoming_without_headers_or_timestamp():
    """Missing headers become an empty dict, a missing timestamp stays None, a naive one is read as UTC."""
    incoming = delivered_to_incoming(delivery(FakeChannel(), 1), "q")
    assert incoming.headers == {}
    assert incoming.timestamp is None
    assert incoming.redelivered is False
    naive = delivered_to_incoming(delivery(FakeChannel(), 1, timestamp=datetime(2026, 1, 1)), "q")  # noqa: DTZ001
    assert naive.timestamp == 1_767_225_600.0


def test_install_replaces_only_a_registered_consumer():
    """The fast callback takes the place of aio-pika's wrapper; a consumer that is not there stays absent."""
    consumer = _Consumer("q", "tag-1", lambda *_: None, lambda *_: None)
    channel = FakeChannel()
    consumer.install(channel)  # type: ignore[arg-type]
    assert channel.consumers == {}  # cancelled meanwhile: stays cancelled
    channel.consumers["tag-1"] = object()
    channel.consumers["other"] = marker = object()
    consumer.install(channel)  # type: ignore[arg-type]
    assert channel.consumers == {"tag-1": consumer.on_delivered, "other": marker}


async def test_aio_pika_delivery_installs_the_fast_callback():
    """After a restore, aio-pika's wrapper delivers once and puts the fast callback back on that channel."""
    delivered: list[tuple[Any, Any]] = []
    tracked: list[tuple[Any, int]] = []
    consumer = _Consumer("q", "tag-1", lambda *args: delivered.append(args), lambda *args: tracked.append(args))
    channel = FakeChannel()
    channel.consumers["tag-1"] = "aio-pika's wrapper"
    message = SimpleNamespace(
        channel=channel,
        delivery_tag=1,
        body=b"{}",
        headers={},
        message_id="m1",
        correlation_id=None,
        timestamp=None,
        content_type=None,
        content_encoding=None,
        type=None,
        redelivered=False,
    )
    await consumer.on_message(message)  # type: ignore[arg-type]
    assert channel.consumers["tag-1"] == consumer.on_delivered
    assert tracked == [(channel, 1)]
    assert delivered[0][1] is message
    second = delivery(channel, 2, message_id="m2")
    await consumer.on_delivered(second)
    assert tracked[-1] == (channel, 2)
    assert delivered[-1][0].message_id == "m2"
    assert delivered[-1][1] is second  # the token is aiormq's delivery itself


async def test_acks_go_to_the_channel_that_delivered(transport):
    """After a reconnect, a delivery of the dead channel is never acked on the new one (tags are per channel)."""
    old, new = FakeChannel(), FakeChannel()
    transport._track(old, 1)
    token_old = delivery(old, 1)
    old.is_closed = True
    transport._track(new, 1)  # the new channel's tags start at 1 again
    assert not transport.is_held(token_old)
    await transport.ack(token_old)  # a real closed aiormq channel raises here instead
    await transport.nack(token_old)
    assert new.frames == []
    assert old.frames == [("ack", 1), ("nack", 1)]
    token_new = delivery(new, 1)
    assert transport.is_held(token_new)
    await transport.ack(token_new)
    assert new.frames == [("ack", 1)]


# -- batched acks ------------------------------------------------------------------------------------


def batching(tags: range, *, batch: int = 4, delay: float = 0.001) -> tuple[AckCoalescer, FakeChannel]:
    channel = FakeChannel()
    acks = AckCoalescer(channel, batch=batch, delay=delay)  # type: ignore[arg-type]
    for tag in tags:
        acks.track(tag)
    return acks, channel


async def test_acks_wait_for_a_full_batch():
    """While deliveries are in flight, acks are written once ``batch`` of them wait: one frame for all."""
    acks, channel = batching(range(1, 11), batch=4, delay=60)
    for tag in range(1, 4):
        await acks.ack(tag)
    assert channel.frames == []
    await acks.ack(4)
    assert channel.frames == [("ack", 4)]  # FakeChannel records the tag: 4 with multiple, covering 1-4


async def test_waiting_acks_are_written_after_the_delay():
    """An ack short of a batch is written at the latest ``delay`` seconds later."""
    acks, channel = batching(range(1, 11), batch=100, delay=0.001)
    await acks.ack(1)
    await acks.ack(2)
    assert channel.frames == []
    await asyncio.sleep(0.02)
    assert channel.frames == [("ack", 2)]


async def test_a_nack_is_written_at_once_and_acks_keep_waiting():
    """A nack goes out at once (requeueing is not delayed); the acks around it wait for their batch or delay."""
    acks, channel = batching(range(1, 4), batch=100, delay=60)
    await acks.ack(1)
    await acks.nack(2)
    assert channel.frames == [("nack", 2)]
    await acks.ack(3)
    await acks.drain()
    assert channel.frames == [("nack", 2), ("ack", 3)]  # one multiple ack over 1 and 3, past the nacked 2


async def test_drain_writes_waiting_acks():
    """Closing the transport writes acks that still wait, so a graceful stop does not cause redeliveries."""
    acks, channel = batching(range(1, 11), batch=100, delay=60)
    await acks.ack(1)
    await acks.ack(2)
    await acks.drain()
    assert channel.frames == [("ack", 2)]
    await acks.drain()
    assert channel.frames == [("ack", 2)]  # nothing twice


async def test_delayed_flush_on_a_closed_channel_is_quiet():
    """A delayed write that fails (its channel closed meanwhile) is dropped: the broker redelivers those."""
    acks, channel = batching(range(1, 11), batch=100, delay=0.001)

    async def closed(*_: Any, **__: Any) -> None:
        raise ConnectionError

    channel.basic_ack = closed  # type: ignore[method-assign]
    await acks.ack(1)
    await asyncio.sleep(0.02)
    await acks.drain()  # does not raise
