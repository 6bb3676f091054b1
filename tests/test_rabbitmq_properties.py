"""The transport's fast AMQP properties encoder writes exactly pamqp's bytes, for any header values."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pamqp.commands import Basic
from pamqp.frame import marshal, unmarshal
from pamqp.header import ContentHeader

from queueable import OutgoingMessage
from queueable.transport import rabbitmq
from queueable.transport.rabbitmq import _properties, amqp_headers


def _stock(message: OutgoingMessage) -> Basic.Properties:
    """What ``_properties`` built before it had its own encoder: plain pamqp properties."""
    return Basic.Properties(
        content_type=message.content_type,
        delivery_mode=2,
        headers=amqp_headers(message.headers),
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        timestamp=datetime.fromtimestamp(message.timestamp, UTC),
        message_type=message.type,
    )


def _message(headers: dict[str, object], **fields: object) -> OutgoingMessage:
    return OutgoingMessage(queue="mail", body=b"{}", headers=headers, **fields)  # type: ignore[arg-type]


QUEUEABLE_HEADERS = {
    "x-queueable-wire": 1,
    "x-queueable-listener": "mailer:notify_author",
    "x-queueable-event": "blog.comment_posted",
    "x-queueable-event-version": 2,
    "x-queueable-attempt": 1,
    "x-queueable-created-at": "2026-11-29T12:00:00.123+00:00",
}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        QUEUEABLE_HEADERS,
        {**QUEUEABLE_HEADERS, "x-queueable-error-message": "boom: ünïcödé ✓", "x-queueable-consumer-pid": 4242},
        {"flag": True, "off": False, "none": None, "ratio": 0.25, "price": Decimal("12.50")},
        {"when": datetime(2026, 1, 1, tzinfo=UTC), "nested": {"k": ["v", 1, {"deep": True}]}, "list": [1, "a"]},
        {"small": -5, "byte": 200, "short": 40_000, "long": 2**40, "neg": -(2**40), "huge": 2**70},
        {"raw": b"\xff\x00", "text-bytes": b"plain", "array": bytearray(b"\x01\x02")},
        {"k" * 200: "a key longer than AMQP's 128 bytes", "ключ": "значение"},
        {
            "x-death": [{"count": 1, "reason": "expired", "queue": "q.delay.1000"}],
            "x-first-death-reason": "expired",
        },
    ],
    ids=["empty", "queueable", "failure", "scalars", "structures", "integers", "bytes", "keys", "broker"],
)
def test_properties_bytes_match_pamqp(headers):
    """Whatever the headers hold, the content header frame is byte for byte what pamqp writes."""
    message = _message(headers, correlation_id="corr", timestamp=1_767_225_600.5, type="blog.comment_posted")
    assert _properties(message).marshal() == _stock(message).marshal()
    assert marshal(ContentHeader(0, 2, _properties(message)), 1) == marshal(
        ContentHeader(0, 2, _stock(message)), 1
    )


def test_optional_properties_left_out_like_pamqp():
    """Without correlation id, type or content type, the flags and bytes still match pamqp's."""
    message = _message(QUEUEABLE_HEADERS, correlation_id=None, type=None, content_type=None)
    assert _properties(message).marshal() == _stock(message).marshal()


def test_many_messages_and_a_full_cache_match_pamqp(monkeypatch):
    """Across cache hits, misses and clears (a tiny cache), every message's properties and content header frame
    encode as pamqp does.
    """
    monkeypatch.setattr(rabbitmq, "_HEADER_VALUES_MAX", 4)
    monkeypatch.setattr(rabbitmq, "_HEADER_KEYS_MAX", 3)
    monkeypatch.setattr(rabbitmq, "_HEADER_ENTRIES", {})
    rng = random.Random(6)
    for n in range(500):
        headers = {
            **QUEUEABLE_HEADERS,
            "x-queueable-listener": f"svc:listener_{rng.randrange(5)}",
            "x-queueable-attempt": rng.randrange(1, 6),
            "x-queueable-created-at": f"2026-11-29T12:00:{n % 60:02d}.{n:03d}+00:00",
            "flag": rng.choice([1, True, "1"]),
        }
        message = _message(headers, correlation_id=f"c{n}", timestamp=1_767_225_600 + n / 7)
        assert _properties(message).marshal() == _stock(message).marshal()
        frame = rabbitmq._header_frame(message, message.message_id, 1, n)
        assert frame == marshal(ContentHeader(0, n, _stock(message)), 1)
    assert len(rabbitmq._HEADER_ENTRIES) <= 3
    assert all(len(values) <= 4 for values in rabbitmq._HEADER_ENTRIES.values())


def test_true_and_one_are_not_confused_by_the_cache(monkeypatch):
    """A header that is True in one message and 1 in the next keeps its AMQP type in each."""
    monkeypatch.setattr(rabbitmq, "_HEADER_ENTRIES", {})
    first = _message({"x": 1})
    second = _message({"x": True})
    assert _properties(first).marshal() == _stock(first).marshal()
    assert _properties(second).marshal() == _stock(second).marshal()
    assert _properties(first).marshal() != _properties(second).marshal()


def test_fast_properties_decode_to_the_same_values():
    """Decoding the frame gives back the headers and every property that was set."""
    message = _message(QUEUEABLE_HEADERS, correlation_id="corr", timestamp=1_767_225_600.0, type="ev")
    _, _, decoded = unmarshal(marshal(ContentHeader(0, 2, _properties(message)), 1))
    got = decoded.properties
    assert got.headers == QUEUEABLE_HEADERS
    assert (got.message_id, got.correlation_id, got.message_type) == (message.message_id, "corr", "ev")
    assert got.delivery_mode == 2
    assert got.timestamp.timestamp() == 1_767_225_600.0


def test_fast_properties_survive_or_defaults():
    """pamqp and aiormq write ``properties or Basic.Properties(...)``: the object is truthy and kept."""
    properties = _properties(_message(QUEUEABLE_HEADERS))
    assert properties
    assert len(properties) == len(Basic.Properties())
    assert "headers" in properties
    assert ContentHeader(0, 2, properties).properties is properties
