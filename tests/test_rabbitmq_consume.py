"""The RabbitMQ transport's consumer side, no broker: aiormq deliveries, the consumer swap, acks per channel."""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError, DeliveryError, InvalidFrameError
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from queueable import Settings
from queueable.transport.rabbitmq import (
    _CLOSING,
    AckCoalescer,
    RabbitMQTransport,
    _Batch,
    _Consumer,
    _Shortcut,
    delivered_to_incoming,
    to_incoming,
)


class FakeChannel:
    """Stands in for an aiormq channel: a consumer table, its frame queue (which the connection's reader fills
    and the channel's reader task drains), an open/closed flag, and the ack frames written.
    """

    def __init__(self) -> None:
        self.consumers: dict[str, Any] = {}
        self.frames: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.is_closed = False
        self.written: list[tuple[str, int]] = []
        self.closed_with: list[BaseException | None] = []

    CHANNEL_CLOSE_TIMEOUT = 10

    async def close(self, exc: BaseException | None = None, timeout: float | None = None) -> None:
        self.closed_with.append(exc)

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.written.append(("ack", tag))

    async def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True) -> None:
        self.written.append(("nack", tag))


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
    assert new.written == []
    assert old.written == [("ack", 1), ("nack", 1)]
    token_new = delivery(new, 1)
    assert transport.is_held(token_new)
    await transport.ack(token_new)
    assert new.written == [("ack", 1)]


# -- the shortcut from the connection's reader to the worker's consumer ------------------------------------


def deliver_frames(tag: int, body: bytes, *, consumer: str = "tag-1", chunk: int = 0) -> list[tuple[int, Any]]:
    """The frames of one delivery as the connection's reader puts them into a channel: (weight, frame)."""
    frames: list[Any] = [
        Basic.Deliver(consumer_tag=consumer, delivery_tag=tag, routing_key="q"),
        ContentHeader(body_size=len(body), properties=Basic.Properties(message_id=f"m{tag}", headers={"h": 1})),
    ]
    step = chunk or len(body) or 1
    frames += [ContentBody(body[start : start + step]) for start in range(0, len(body), step)]
    return [(0, frame) for frame in frames]


def installed(channel: FakeChannel) -> tuple[_Consumer, list[tuple[Any, Any]], list[tuple[Any, int]]]:
    """A consumer registered on ``channel`` and installed, with what it handed over and tracked."""
    delivered: list[tuple[Any, Any]] = []
    tracked: list[tuple[Any, int]] = []
    consumer = _Consumer("q", "tag-1", lambda *args: delivered.append(args), lambda *args: tracked.append(args))
    channel.consumers["tag-1"] = "aio-pika's wrapper"
    consumer.install(channel)  # type: ignore[arg-type]
    return consumer, delivered, tracked


async def put_all(channel: FakeChannel, frames: list[tuple[int, Any]]) -> None:
    for item in frames:
        await channel.frames.put(item)  # what aiormq's Connection.__reader does with every frame


async def test_shortcut_hands_a_delivery_over_without_aiormqs_queue():
    """Deliver, header and body are assembled at the connection's reader and handed to the worker at once."""
    channel = FakeChannel()
    _, delivered, tracked = installed(channel)
    await put_all(channel, deliver_frames(1, b'{"a": 1}') + deliver_frames(2, b"{}"))
    assert channel.frames.qsize() == 0  # nothing left for aiormq's channel reader
    assert tracked == [(channel, 1), (channel, 2)]
    assert [(incoming.message_id, incoming.body, incoming.headers) for incoming, _ in delivered] == [
        ("m1", b'{"a": 1}', {"h": 1}),
        ("m2", b"{}", {"h": 1}),
    ]
    token = delivered[0][1]
    assert isinstance(token, DeliveredMessage)
    assert token.channel is channel
    assert token.delivery.delivery_tag == 1
    assert _Shortcut.on(channel).taken == 2  # type: ignore[arg-type]


async def test_shortcut_joins_a_body_split_over_frames_and_takes_an_empty_one():
    """A body larger than the broker's frame size arrives in several frames; an empty one in none."""
    channel = FakeChannel()
    _, delivered, _ = installed(channel)
    body = bytes(range(256)) * 40
    await put_all(channel, deliver_frames(1, body, chunk=1000) + deliver_frames(2, b""))
    assert [incoming.body for incoming, _ in delivered] == [body, b""]
    assert channel.frames.qsize() == 0


async def test_shortcut_does_not_disturb_frames_waiting_for_aiormq():
    """While aiormq's channel reader is behind (frames wait in its queue, a delivery of aio-pika's wrapper among
    them), a delivery for the installed consumer is still handed over at once, and the waiting frames stay as
    they were, in order: under a backlog the shortcut does not fall back to aiormq's path for good.
    """
    channel = FakeChannel()
    consumer, delivered, _ = installed(channel)
    channel.consumers["tag-1"] = "aio-pika's wrapper"  # deliveries that came before the install
    early = deliver_frames(1, b"{}")
    await put_all(channel, early)
    consumer.install(channel)  # type: ignore[arg-type]
    await put_all(channel, deliver_frames(2, b"{}"))
    assert [incoming.message_id for incoming, _ in delivered] == ["m2"]
    assert [channel.frames.get_nowait() for _ in range(3)] == early
    assert channel.frames.qsize() == 0


async def test_shortcut_only_serves_consumers_that_aiormq_still_calls_it_for():
    """Other frames, other consumers, a cancelled consumer and one that a restore replaced all go to aiormq."""
    channel = FakeChannel()
    _, delivered, _ = installed(channel)
    confirm = (0, Basic.Ack(delivery_tag=1))
    await channel.frames.put(confirm)
    assert channel.frames.get_nowait() == confirm
    frames = deliver_frames(1, b"{}", consumer="other")
    await put_all(channel, frames)
    assert [channel.frames.get_nowait() for _ in frames] == frames
    channel.consumers["tag-1"] = "aio-pika's wrapper again"  # a restore re-registered it
    frames = deliver_frames(2, b"{}")
    await put_all(channel, frames)
    assert [channel.frames.get_nowait() for _ in frames] == frames
    del channel.consumers["tag-1"]  # cancelled
    await put_all(channel, deliver_frames(3, b"{}"))
    assert channel.frames.qsize() == 3
    assert delivered == []


async def test_shortcut_is_installed_once_per_channel():
    """Installing consumers again (a restore, a second queue) keeps one shortcut on the channel's queue."""
    channel = FakeChannel()
    consumer, delivered, _ = installed(channel)
    shortcut = _Shortcut.on(channel)  # type: ignore[arg-type]
    consumer.install(channel)  # type: ignore[arg-type]
    second = _Consumer("q2", "tag-2", lambda *args: delivered.append(args), lambda *_: None)
    channel.consumers["tag-2"] = "aio-pika's wrapper"
    second.install(channel)  # type: ignore[arg-type]
    assert _Shortcut.on(channel) is shortcut  # type: ignore[arg-type]
    await put_all(channel, deliver_frames(1, b"{}") + deliver_frames(2, b"{}", consumer="tag-2"))
    assert [(incoming.queue, incoming.message_id) for incoming, _ in delivered] == [("q", "m1"), ("q2", "m2")]
    assert shortcut.taken == 2


async def test_shortcut_logs_a_failing_hand_over_and_goes_on(caplog):
    """A consumer that raises is logged, as aiormq logs a failed consumer task; the channel keeps delivering."""
    channel = FakeChannel()
    calls: list[str] = []

    def deliver(incoming: Any, _token: Any) -> None:
        calls.append(incoming.message_id)
        if incoming.message_id == "m1":
            raise RuntimeError("boom")

    consumer = _Consumer("q", "tag-1", deliver, lambda *_: None)
    channel.consumers["tag-1"] = "aio-pika's wrapper"
    consumer.install(channel)  # type: ignore[arg-type]
    await put_all(channel, deliver_frames(1, b"{}") + deliver_frames(2, b"{}"))
    assert calls == ["m1", "m2"]
    assert "handing over delivery 1 failed" in caplog.text


async def test_shortcut_closes_only_the_channel_on_frames_out_of_protocol_order(caplog):
    """A delivery not followed by its content frames is a protocol error: that channel is closed with it (as
    aiormq's reader does), the connection's reader goes on, and the next delivery is assembled afresh.
    """
    channel = FakeChannel()
    _, delivered, _ = installed(channel)
    await channel.frames.put((0, Basic.Deliver(consumer_tag="tag-1", delivery_tag=1, routing_key="q")))
    await channel.frames.put((0, Basic.Ack(delivery_tag=1)))  # no exception into the connection's reader
    frames = deliver_frames(2, b"{}")
    await put_all(channel, frames[:2])
    await channel.frames.put((0, Basic.Ack(delivery_tag=2)))
    await asyncio.sleep(0)
    assert [type(error) for error in channel.closed_with] == [InvalidFrameError, InvalidFrameError]
    assert "instead of a content header" in str(channel.closed_with[0])
    assert "instead of a content body" in str(channel.closed_with[1])
    assert "closing channel" in caplog.text
    await put_all(channel, deliver_frames(3, b"{}"))
    assert [incoming.message_id for incoming, _ in delivered] == ["m3"]
    assert channel.frames.qsize() == 0


async def test_a_channel_close_that_fails_is_retrieved_and_logged(caplog):
    """No close-ok in time (aiormq raises TimeoutError from close): read and logged, not left unretrieved."""
    caplog.set_level(logging.DEBUG, logger="queueable")
    channel = FakeChannel()

    async def close(exc: BaseException | None = None, timeout: float | None = None) -> None:
        raise TimeoutError

    channel.close = close  # type: ignore[method-assign]
    installed(channel)
    await channel.frames.put((0, Basic.Deliver(consumer_tag="tag-1", delivery_tag=1, routing_key="q")))
    await channel.frames.put((0, Basic.Ack(delivery_tag=1)))
    for _ in range(3):
        await asyncio.sleep(0)
    assert not _CLOSING
    assert "closing the channel failed" in caplog.text


class ConfirmingChannel(FakeChannel):
    """A publishing channel: confirmations by delivery tag, resolved as aiormq's ``_confirm_delivery`` does."""

    publisher_confirms = True

    def __init__(self, tags: range) -> None:
        super().__init__()
        loop = asyncio.get_running_loop()
        self.confirmations: dict[int, asyncio.Future[Any]] = {tag: loop.create_future() for tag in tags}

    def _confirm_delivery(self, tag: int, frame: Any) -> None:
        confirmation = self.confirmations.pop(tag)
        if isinstance(frame, Basic.Ack):
            confirmation.set_result(frame)
        else:
            confirmation.set_exception(RuntimeError(f"nacked {tag}"))


async def test_shortcut_resolves_confirms_at_once_a_multiple_one_included():
    """An ack resolves its publish in the reader's step; a multiple one every publish up to its tag."""
    channel = ConfirmingChannel(range(1, 6))
    futures = dict(channel.confirmations)
    shortcut = _Shortcut.on(channel)  # type: ignore[arg-type]
    await channel.frames.put((0, Basic.Ack(delivery_tag=1)))
    assert futures[1].done()
    assert not futures[2].done()
    await channel.frames.put((0, Basic.Ack(delivery_tag=3, multiple=True)))
    assert all(futures[tag].done() for tag in (2, 3))
    await channel.frames.put((0, Basic.Nack(delivery_tag=4)))
    with pytest.raises(RuntimeError, match="nacked 4"):
        futures[4].result()
    assert list(channel.confirmations) == [5]
    assert channel.frames.qsize() == 0
    assert shortcut.confirmed == 3


async def test_shortcut_leaves_a_confirm_behind_waiting_frames_to_aiormq(caplog):
    """A basic.return (unroutable) comes before the ack of its publish: while frames wait for aiormq's reader, an
    ack waits behind them, so that the return fails the publish first. A confirm for no publish is logged.
    """
    channel = ConfirmingChannel(range(1, 3))
    _Shortcut.on(channel)  # type: ignore[arg-type]
    returned = (0, Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="x", routing_key="k"))
    await channel.frames.put(returned)
    ack = (0, Basic.Ack(delivery_tag=1))
    await channel.frames.put(ack)
    assert not channel.confirmations[1].done()
    assert [channel.frames.get_nowait() for _ in range(2)] == [returned, ack]
    await channel.frames.put((0, Basic.Ack(delivery_tag=9)))
    assert "Unexpected confirmation frame" in caplog.text
    assert channel.frames.qsize() == 0


async def test_shortcut_takes_no_confirms_on_a_channel_without_confirm_mode():
    """A consuming channel (no confirm mode) passes acks on to aiormq, which ignores them there."""
    channel = FakeChannel()
    _Shortcut.on(channel)  # type: ignore[arg-type]
    ack = (0, Basic.Ack(delivery_tag=1))
    await channel.frames.put(ack)
    assert channel.frames.get_nowait() == ack


async def test_a_batch_is_done_when_every_message_has_its_outcome():
    """A batch's confirmations stand in for aiormq's futures: each records its outcome (ack, nack, return) and
    the batch's one future is done when the last one is in; resolving one twice is an error, as with a future.
    """
    loop = asyncio.get_running_loop()
    batch = _Batch(SimpleNamespace(create_future=loop.create_future), 3)  # type: ignore[arg-type]
    ack, nack, returned = batch.confirms()
    ack.set_result(Basic.Ack(delivery_tag=1))
    nack.set_exception(DeliveryError(None, Basic.Nack(delivery_tag=2)))  # type: ignore[arg-type]
    assert not batch.future.done()
    assert not returned.done()
    assert not returned.cancelled()
    returned.set_exception(RuntimeError)  # aiormq may pass an exception class
    assert batch.future.done()
    assert await batch.wait() is None
    assert ack.outcome is None
    assert isinstance(nack.outcome, DeliveryError)
    assert isinstance(returned.outcome, RuntimeError)
    with pytest.raises(asyncio.InvalidStateError):
        ack.set_result(None)


async def test_a_batch_cut_by_a_closing_channel_reports_the_close_for_what_is_unconfirmed():
    """aiormq rejects its futures when the channel closes: the batch's unconfirmed messages fail with that (or,
    cancelled by aiormq, as a lost connection); the caller's own cancellation propagates.
    """
    loop = asyncio.get_running_loop()
    channel = SimpleNamespace(create_future=loop.create_future)
    batch = _Batch(channel, 2)  # type: ignore[arg-type]
    batch.confirms()[0].set_result(None)
    batch.future.set_exception(ChannelInvalidStateError("closed"))
    assert isinstance(await batch.wait(), ChannelInvalidStateError)
    died = _Batch(channel, 1)  # type: ignore[arg-type]
    died.future.set_exception(ValueError("Unexpected frame"))  # aiormq's channel reader died of a bad frame
    lost = await died.wait()
    assert isinstance(lost, ConnectionError)
    assert "Unexpected frame" in str(lost)
    cancelled = _Batch(channel, 1)  # type: ignore[arg-type]
    cancelled.future.cancel()
    assert isinstance(await cancelled.wait(), ConnectionError)
    waiting = _Batch(channel, 1)  # type: ignore[arg-type]
    (late,) = waiting.confirms()
    task = asyncio.create_task(waiting.wait())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    late.set_result(None)  # the confirm that arrives later is taken quietly


async def test_a_finished_batch_is_freed_without_the_cycle_collector():
    """A batch and its confirmations form no reference cycle: they go when the publish is done, not at the next
    full collection (which would keep a returned message's body alive meanwhile).
    """
    loop = asyncio.get_running_loop()
    channel = SimpleNamespace(create_future=loop.create_future)
    gc.collect()
    gc.disable()
    try:
        batch = _Batch(channel, 2)  # type: ignore[arg-type]
        confirms = batch.confirms()
        confirms[0].set_result(None)
        confirms[1].set_exception(RuntimeError("returned"))
        assert await batch.wait() is None
        del batch, confirms
        assert gc.collect() == 0
    finally:
        gc.enable()


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
    assert channel.written == []
    await acks.ack(4)
    assert channel.written == [("ack", 4)]  # FakeChannel records the tag: 4 with multiple, covering 1-4


async def test_waiting_acks_are_written_after_the_delay():
    """An ack short of a batch is written at the latest ``delay`` seconds later."""
    acks, channel = batching(range(1, 11), batch=100, delay=0.001)
    await acks.ack(1)
    await acks.ack(2)
    assert channel.written == []
    await asyncio.sleep(0.02)
    assert channel.written == [("ack", 2)]


async def test_a_nack_is_written_at_once_and_acks_keep_waiting():
    """A nack goes out at once (requeueing is not delayed); the acks around it wait for their batch or delay."""
    acks, channel = batching(range(1, 4), batch=100, delay=60)
    await acks.ack(1)
    await acks.nack(2)
    assert channel.written == [("nack", 2)]
    await acks.ack(3)
    await acks.drain()
    assert channel.written == [("nack", 2), ("ack", 3)]  # one multiple ack over 1 and 3, past the nacked 2


async def test_drain_writes_waiting_acks():
    """Closing the transport writes acks that still wait, so a graceful stop does not cause redeliveries."""
    acks, channel = batching(range(1, 11), batch=100, delay=60)
    await acks.ack(1)
    await acks.ack(2)
    await acks.drain()
    assert channel.written == [("ack", 2)]
    await acks.drain()
    assert channel.written == [("ack", 2)]  # nothing twice


async def test_delayed_flush_on_a_closed_channel_is_quiet():
    """A delayed write that fails (its channel closed meanwhile) is dropped: the broker redelivers those."""
    acks, channel = batching(range(1, 11), batch=100, delay=0.001)

    async def closed(*_: Any, **__: Any) -> None:
        raise ConnectionError

    channel.basic_ack = closed  # type: ignore[method-assign]
    await acks.ack(1)
    await asyncio.sleep(0.02)
    await acks.drain()  # does not raise
