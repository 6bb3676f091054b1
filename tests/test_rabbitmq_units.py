"""The RabbitMQ transport's pure parts: delay buckets, topology arguments, headers, masking (no broker)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import ssl
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace

import pytest
from pamqp import encode
from pamqp.commands import Basic
from pamqp.frame import marshal, unmarshal
from pamqp.header import ContentHeader

from queueable import ConfigurationError, DeadReason, OutgoingMessage, RetryPolicy, Settings
from queueable.transport.rabbitmq import (
    DELAY_BUCKETS_MS,
    DELAY_QUEUE_GRACE_MS,
    DELAY_REDECLARE_S,
    MAX_DELAY_MS,
    AckCoalescer,
    RabbitMQTransport,
    _properties,
    _safe_cause,
    amqp_headers,
    dead_reason_of,
    delay_bucket_ms,
    delay_queue_for,
    delay_queue_spec,
    scrub,
    ssl_context,
    to_incoming,
    topology_for,
)

URL = "amqp://user:s3cret@broker.example:5672/vh"


# -- delay buckets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delay", "bucket"),
    [(0, 0), (-1, 0), (math.nan, 0), (0.001, 10), (0.2, 200), (0.3, 320), (1, 1000), (1.01, 1250), (60, 64_000)],
)
def test_delay_bucket_examples(delay, bucket):
    """Delays round up to the next bucket; no delay means no delay queue."""
    assert delay_bucket_ms(delay) == bucket


def test_delay_bucket_never_early_and_at_most_28_percent_late():
    """For any delay in range, the bucket is >= the delay and less than 1.29 times it (plus 1 ms of rounding)."""
    rng = random.Random(7)
    for _ in range(10_000):
        delay = 10 ** rng.uniform(-2, 5.8)
        bucket = delay_bucket_ms(delay)
        assert bucket >= delay * 1000 - 1e-6
        assert bucket < delay * 1000 * 1.29 + 1


def test_delay_bucket_caps_huge_delays():
    """A delay beyond the largest bucket uses the largest bucket (about 7.4 days)."""
    assert delay_bucket_ms(365 * 86_400) == MAX_DELAY_MS == DELAY_BUCKETS_MS[-1]
    assert delay_bucket_ms(math.inf) == MAX_DELAY_MS  # not OverflowError, which requeued the message forever


def test_default_retry_policy_uses_few_buckets():
    """The default policy's jittered delays fall into a handful of delay queues, not one per message."""
    policy = RetryPolicy()
    rng = random.Random(1)
    buckets = {delay_bucket_ms(policy.delay_for(attempt, rng=rng)) for attempt in range(1, 5) for _ in range(1000)}
    assert len(buckets) <= 8


def test_delay_queue_name():
    """Delay queues are named Q.delay.<ms>."""
    assert delay_queue_for("mail", 1250) == "mail.delay.1250"


# -- topology ----------------------------------------------------------------------------------------


def test_quorum_topology_arguments():
    """Quorum work queues get the delivery limit and at-least-once dead-lettering to Q.dead."""
    work, dead = topology_for(Settings(url=URL, delivery_limit=7), ["mail"])
    assert work.name == "mail"
    assert work.binding == "mail"
    assert work.arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 7,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "mail.dead",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert (dead.name, dead.binding, dead.arguments) == ("mail.dead", "mail.dead", {"x-queue-type": "quorum"})


def test_classic_topology_arguments():
    """Classic queues have no delivery limit and no at-least-once strategy (classic queues lack both)."""
    work, dead = topology_for(Settings(url=URL, queue_type="classic"), ["mail"])
    assert work.arguments == {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "mail.dead",
    }
    assert dead.arguments == {"x-queue-type": "classic"}


def test_topology_deduplicates_queues():
    """A queue named twice is declared once."""
    specs = topology_for(Settings(url=URL), ["a", "b", "a"])
    assert [s.name for s in specs] == ["a", "a.dead", "b", "b.dead"]


def test_delay_queue_spec_outlives_its_messages():
    """A delay queue dead-letters back to Q and expires only well after its TTL, even between re-declarations."""
    spec = delay_queue_spec(Settings(url=URL), "mail", 2000)
    assert spec.name == "mail.delay.2000"
    assert spec.binding is None
    assert spec.arguments["x-message-ttl"] == 2000
    assert spec.arguments["x-dead-letter-routing-key"] == "mail"
    assert spec.arguments["x-dead-letter-strategy"] == "at-least-once"
    # Redeclared at least every DELAY_REDECLARE_S while used: a message parked just before the lease would have
    # run out still leaves before the queue can expire.
    assert spec.arguments["x-expires"] - spec.arguments["x-message-ttl"] == DELAY_QUEUE_GRACE_MS
    assert DELAY_REDECLARE_S * 1000 < DELAY_QUEUE_GRACE_MS
    assert spec.as_dict()["queue"] == "mail.delay.2000"


# -- headers and properties --------------------------------------------------------------------------


def test_plain_headers_are_not_copied():
    """Headers that AMQP can carry as they are are passed through without a copy (the hot path)."""
    headers = {"a": "text", "b": 3, "c": True, "d": None, "e": 1.5}
    assert amqp_headers(headers) is headers


def test_unencodable_header_values_are_converted():
    """bytes, tuples, huge ints and arbitrary objects become values pamqp can encode."""
    headers = {
        "utf8": b"caf\xc3\xa9",
        "binary": b"\xff\x00",
        "tuple": (1, "two"),
        "huge": 2**70,
        "object": object,
        "nested": {"k": (b"v",)},
        "when": datetime(2026, 1, 1, tzinfo=UTC),
        "dec": Decimal("1.5"),
    }
    converted = amqp_headers(headers)
    assert converted["utf8"] == "café"
    assert converted["binary"] == bytearray(b"\xff\x00")
    assert converted["tuple"] == [1, "two"]
    assert converted["huge"] == str(2**70)
    assert converted["object"] == str(object)
    assert converted["nested"] == {"k": ["v"]}
    encode.field_table(converted)  # raises TypeError if anything is left that AMQP cannot carry


def test_properties_round_trip_through_the_wire():
    """A message's properties survive AMQP encoding: persistent, ids, type, headers and timestamp."""
    message = OutgoingMessage(
        queue="mail",
        body=b"{}",
        headers={"x-queueable-listener": "mailer:notify", "x-queueable-attempt": 2, "raw": b"\xff"},
        correlation_id="corr",
        timestamp=1_767_225_600.0,
        type="comment.posted",
    )
    properties = _properties(message)
    assert properties.delivery_mode == 2
    frame = marshal(ContentHeader(0, 2, properties), 1)
    _, _, decoded = unmarshal(frame)
    got = decoded.properties
    assert got.message_id == message.message_id
    assert got.correlation_id == "corr"
    assert got.message_type == "comment.posted"
    assert got.content_type == "application/json"
    assert got.headers["x-queueable-listener"] == "mailer:notify"
    assert got.headers["x-queueable-attempt"] == 2
    assert got.timestamp.timestamp() == 1_767_225_600.0


def test_to_incoming_converts_a_delivery():
    """An aio-pika delivery becomes an IncomingMessage; a naive AMQP timestamp is read as UTC."""
    delivery = SimpleNamespace(
        body=b"{}",
        headers={"x-queueable-listener": "a:b"},
        message_id="m1",
        correlation_id="c1",
        timestamp=datetime(2026, 1, 1),  # noqa: DTZ001 - what a decoder without tzinfo yields
        content_type="application/json",
        content_encoding=None,
        type="ev",
        redelivered=True,
    )
    incoming = to_incoming(delivery, "mail")  # type: ignore[arg-type]
    assert incoming.queue == "mail"
    assert incoming.headers is delivery.headers
    assert incoming.timestamp == 1_767_225_600.0
    assert incoming.redelivered is True
    assert (incoming.message_id, incoming.correlation_id, incoming.type) == ("m1", "c1", "ev")


def test_to_incoming_without_headers_or_timestamp():
    """Missing headers become an empty dict and a missing timestamp stays None."""
    delivery = SimpleNamespace(
        body=b"",
        headers=None,
        message_id=None,
        correlation_id=None,
        timestamp=None,
        content_type=None,
        content_encoding=None,
        type=None,
        redelivered=False,
    )
    incoming = to_incoming(delivery, "q")  # type: ignore[arg-type]
    assert incoming.headers == {}
    assert incoming.timestamp is None


def test_basic_properties_type_is_pamqp():
    """The transport builds pamqp properties directly (no aio_pika.Message per publish)."""
    assert isinstance(_properties(OutgoingMessage(queue="q", body=b"", headers={})), Basic.Properties)


# -- dead reasons ------------------------------------------------------------------------------------


def test_dead_reason_from_queueable_header():
    """The worker's own dead letters carry their reason."""
    assert dead_reason_of({"x-queueable-dead-reason": "not_json"}) == DeadReason.NOT_JSON
    assert dead_reason_of({"x-queueable-dead-reason": b"schema"}) == DeadReason.SCHEMA
    assert dead_reason_of({"x-queueable-dead-reason": "from-the-future"}) is None


def test_dead_reason_delivery_limit_from_x_death():
    """A broker dead-lettered message (delivery limit) is recognised from x-first-death-reason or x-death."""
    assert dead_reason_of({"x-first-death-reason": "delivery_limit"}) == DeadReason.DELIVERY_LIMIT
    retried_then_dead = {
        "x-first-death-reason": "expired",
        "x-death": [{"reason": "expired", "queue": "q.delay.1000"}, {"reason": "delivery_limit", "queue": "q"}],
    }
    assert dead_reason_of(retried_then_dead) == DeadReason.DELIVERY_LIMIT
    assert dead_reason_of({"x-death": [{"reason": "expired"}]}) is None
    assert dead_reason_of({}) is None


# -- secrets -----------------------------------------------------------------------------------------


def test_transport_repr_masks_password():
    """The transport's repr shows the URL without its password."""
    transport = RabbitMQTransport(Settings(url=URL), queues=["q"])
    assert "s3cret" not in repr(transport)
    assert "user:***@broker.example" in repr(transport)


def test_scrub_removes_credentials_from_library_text():
    """Library messages with a URL or the bare password are scrubbed."""
    assert scrub(f"cannot connect to {URL}") == "cannot connect to amqp://user:***@broker.example:5672/vh"
    assert scrub("auth failed for password s3cret", URL) == "auth failed for password ***"


def test_safe_cause_drops_exceptions_that_leak():
    """An exception whose text holds the password is not chained; a harmless one is."""
    leaky = ConnectionError(f"failed: {URL}")
    harmless = ConnectionError("refused")
    assert _safe_cause(leaky, URL) is None
    assert _safe_cause(harmless, URL) is harmless
    wrapper = RuntimeError("outer")
    wrapper.__cause__ = leaky
    assert _safe_cause(wrapper, URL) is None


def test_memory_url_is_refused():
    """The RabbitMQ transport needs an amqp(s) URL."""
    with pytest.raises(ConfigurationError, match="amqp"):
        RabbitMQTransport(Settings(url="memory://"))


# -- TLS ---------------------------------------------------------------------------------------------


def test_no_tls_for_amqp():
    """Plain amqp:// gets no TLS context."""
    assert ssl_context(Settings(url=URL)) is None


def test_tls_context_for_amqps():
    """amqps:// verifies certificates and host names by default; verify=False turns both off."""
    strict = ssl_context(Settings(url="amqps://u:p@h/"))
    assert strict is not None
    assert strict.verify_mode == ssl.CERT_REQUIRED
    assert strict.check_hostname
    lax = ssl_context(Settings(url="amqps://u:p@h/", tls={"verify": False}))
    assert lax is not None
    assert lax.verify_mode == ssl.CERT_NONE


def test_tls_bad_settings_are_configuration_errors(tmp_path):
    """Unknown TLS keys and unreadable files fail early with ConfigurationError."""
    with pytest.raises(ConfigurationError, match="unknown TLS"):
        ssl_context(Settings(url="amqps://h/", tls={"cafiel": "x"}))
    with pytest.raises(ConfigurationError, match="invalid TLS"):
        ssl_context(Settings(url="amqps://h/", tls={"cafile": str(tmp_path / "missing.pem")}))


def test_tls_and_broker_options_from_environment():
    """QUEUEABLE_TLS_*, QUEUEABLE_DELIVERY_LIMIT and QUEUEABLE_CONNECT_TIMEOUT reach Settings."""
    settings = Settings.from_env(
        {
            "QUEUEABLE_URL": "amqps://u:p@h/",
            "QUEUEABLE_TLS_CAFILE": "/etc/ca.pem",
            "QUEUEABLE_TLS_VERIFY": "false",
            "QUEUEABLE_DELIVERY_LIMIT": "5",
            "QUEUEABLE_CONNECT_TIMEOUT": "2.5",
        }
    )
    assert settings.tls == {"cafile": "/etc/ca.pem", "verify": False}
    assert settings.delivery_limit == 5
    assert settings.connect_timeout == 2.5
    with pytest.raises(ConfigurationError, match="QUEUEABLE_TLS_VERIFY"):
        Settings.from_env({"QUEUEABLE_TLS_VERIFY": "perhaps"})


# -- ack coalescing ----------------------------------------------------------------------------------


class FrameRecorder:
    """Stands in for an aiormq channel: records ack and nack frames in the order they are written."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.frames.append(("ack", tag, multiple))

    async def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True) -> None:
        self.frames.append(("nack", tag, multiple))


ACK_WAIT = 0.001


def coalescer(tags: range) -> tuple[AckCoalescer, FrameRecorder]:
    channel = FrameRecorder()
    acks = AckCoalescer(channel, batch=64, delay=ACK_WAIT)  # type: ignore[arg-type]
    for tag in tags:
        acks.track(tag)
    return acks, channel


async def test_acks_finishing_together_become_one_multiple_ack():
    """Handlers finishing in the same loop iteration are acked with one multiple=True frame."""
    acks, channel = coalescer(range(1, 6))
    await asyncio.gather(*(acks.ack(tag) for tag in range(1, 6)))
    await asyncio.sleep(ACK_WAIT * 5)
    assert channel.frames == [("ack", 5, True)]


async def test_ack_behind_a_running_handler_is_sent_alone_at_once():
    """An ack behind a delivery still in progress waits no longer than the delay; no multiple ack covers tag 1."""
    acks, channel = coalescer(range(1, 4))
    await acks.ack(2)
    await acks.ack(3)
    await asyncio.sleep(ACK_WAIT * 5)
    assert channel.frames == [("ack", 2, False), ("ack", 3, False)]
    await acks.ack(1)
    await asyncio.sleep(ACK_WAIT * 5)
    assert channel.frames[-1] == ("ack", 1, False)  # 2 and 3 are already acked: tag 1 alone


async def test_nack_is_never_covered_by_a_multiple_ack():
    """A nacked delivery in the middle is written before the multiple ack that passes over it."""
    acks, channel = coalescer(range(1, 5))
    await acks.nack(2)
    await asyncio.gather(acks.ack(1), acks.ack(3), acks.ack(4))
    await asyncio.sleep(ACK_WAIT * 5)
    assert channel.frames[0] == ("nack", 2, False)
    assert channel.frames[1:] == [("ack", 4, True)]


async def test_gap_in_tags_stops_the_multiple_ack():
    """A delivery tag not yet seen (its callback has not run) is never covered by a multiple ack."""
    acks, channel = coalescer(range(1, 4))  # tag 4 missing
    acks.track(5)
    await asyncio.gather(acks.ack(1), acks.ack(2), acks.ack(3), acks.ack(5))
    await asyncio.sleep(ACK_WAIT * 5)
    assert ("ack", 3, True) in channel.frames
    assert ("ack", 5, False) in channel.frames
    assert not any(multiple and tag >= 4 for _, tag, multiple in channel.frames)


async def test_unknown_tag_is_acked_alone():
    """An ack for a tag the coalescer never tracked goes out on its own."""
    acks, channel = coalescer(range(0))
    await acks.ack(9)
    assert channel.frames == [("ack", 9, False)]


async def test_every_tag_acked_exactly_once_in_random_order():
    """Whatever the completion order, each delivery is acked exactly once and nacks are never acked."""
    rng = random.Random(3)
    for _ in range(200):
        count = rng.randint(1, 30)
        acks, channel = coalescer(range(1, count + 1))
        outcomes = {tag: rng.random() < 0.8 for tag in range(1, count + 1)}  # True: ack, False: nack
        order = list(outcomes)
        rng.shuffle(order)

        async def settle(tag: int, delay: int, acks: AckCoalescer = acks, outcomes: dict = outcomes) -> None:
            for _ in range(delay):
                await asyncio.sleep(0)
            if outcomes[tag]:
                await acks.ack(tag)
            else:
                await acks.nack(tag)

        await asyncio.gather(*(settle(tag, rng.randint(0, 3)) for tag in order))
        await acks.drain()
        acked: list[int] = []
        done: set[int] = set()
        for kind, tag, multiple in channel.frames:
            if kind == "nack":
                assert tag not in done
                done.add(tag)
                continue
            assert tag not in done  # never ack a tag twice (a channel error on a real broker)
            covered = [t for t in range(1, tag + 1) if t not in done] if multiple else [tag]
            assert all(outcomes[t] for t in covered)  # never ack something that was to be nacked
            acked.extend(covered)
            done.update(covered)
        assert sorted(acked) == sorted(t for t, ok in outcomes.items() if ok)


async def test_ack_cancelled_midway_is_still_sent():
    """A handler cancelled (shutdown timeout) right after marking its ack still gets the ack written."""
    acks, channel = coalescer(range(1, 2))
    task = asyncio.create_task(acks.ack(1))
    await asyncio.sleep(0)  # the ack is marked and yields once
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.sleep(ACK_WAIT * 5)
    assert channel.frames == [("ack", 1, False)]


async def test_start_consuming_retries_a_broker_that_is_still_starting(monkeypatch: pytest.MonkeyPatch):
    """A node that closes the connection (INTERNAL_ERROR) while its quorum queues come up is tried again until
    the connect timeout, instead of the worker exiting at the first failure; past the timeout, ConnectionError.
    """
    from queueable.transport import rabbitmq  # noqa: PLC0415

    monkeypatch.setattr(rabbitmq, "_RETRY_PAUSE", 0.01)
    transport = RabbitMQTransport(Settings(url="amqp://guest:secret@localhost/", connect_timeout=0.5))
    attempts: list[int] = []

    async def flaky(queues: object, *, prefetch: int, deliver: object) -> None:
        attempts.append(prefetch)
        if len(attempts) < 3:
            raise ConnectionError("INTERNAL_ERROR")

    monkeypatch.setattr(transport, "_start_consuming", flaky)
    await transport.start_consuming(["jobs"], prefetch=8, deliver=print)
    assert attempts == [8, 8, 8]

    async def never(queues: object, *, prefetch: int, deliver: object) -> None:
        raise ConnectionError("INTERNAL_ERROR")

    monkeypatch.setattr(transport, "_start_consuming", never)
    with pytest.raises(ConnectionError, match="cannot consume from RabbitMQ") as caught:
        await transport.start_consuming(["jobs"], prefetch=8, deliver=print)
    assert "secret" not in str(caught.value)


async def test_setup_does_not_retry_refused_access_and_runs_nested_setups_once(monkeypatch: pytest.MonkeyPatch):
    """ACCESS_REFUSED is a configuration problem (no retry); a setup inside another runs once, one deadline."""
    import aiormq.exceptions  # noqa: PLC0415

    from queueable.transport import rabbitmq  # noqa: PLC0415

    monkeypatch.setattr(rabbitmq, "_RETRY_PAUSE", 0.01)
    transport = RabbitMQTransport(Settings(url="amqp://guest:secret@localhost/", connect_timeout=0.3))
    calls: list[str] = []

    async def refused() -> None:
        calls.append("refused")
        raise aiormq.exceptions.ChannelAccessRefused("ACCESS_REFUSED - no read access")

    with pytest.raises(ConfigurationError, match="refused access"):
        await transport._retrying_setup(refused, "cannot consume from")
    assert calls == ["refused"]

    async def inner() -> None:
        calls.append("inner")
        raise ConnectionError("INTERNAL_ERROR")

    async def outer() -> None:
        await transport._retrying_setup(inner, "cannot set up")

    calls.clear()
    with pytest.raises(ConnectionError, match=r"^cannot consume from amqp://guest:\*\*\*@localhost/: ") as caught:
        await transport._retrying_setup(outer, "cannot consume from")
    assert "cannot set up" not in str(caught.value)  # the inner setup did not retry and wrap on its own
    assert len(calls) >= 2
