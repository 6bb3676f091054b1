"""The batch publisher's content header frame is byte for byte what pamqp writes for the same message."""

from __future__ import annotations

import enum
import random
from datetime import UTC, datetime

import pytest
from pamqp.commands import Basic
from pamqp.frame import marshal
from pamqp.header import ContentHeader

from queueable import OutgoingMessage
from queueable.transport import rabbitmq
from queueable.transport.rabbitmq import _header_frame, amqp_headers

HEADERS = {
    "x-queueable-wire": 1,
    "x-queueable-listener": "mailer:notify_author",
    "x-queueable-event": "blog.comment_posted",
    "x-queueable-event-version": 2,
    "x-queueable-attempt": 1,
    "x-queueable-created-at": "2026-11-29T12:00:00.123+00:00",
}


def _pamqp(message: OutgoingMessage, message_id: str, channel: int, size: int) -> bytes:
    properties = Basic.Properties(
        content_type=message.content_type,
        delivery_mode=2,
        headers=amqp_headers(message.headers),
        message_id=message_id,
        correlation_id=message.correlation_id,
        timestamp=datetime.fromtimestamp(message.timestamp, UTC),
        message_type=message.type,
    )
    return marshal(ContentHeader(0, size, properties), channel)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"correlation_id": "corr", "type": "blog.comment_posted"},
        {"correlation_id": None, "type": None, "content_type": None},
        {"correlation_id": "", "type": "", "content_type": ""},
        {"correlation_id": "ünïcödé ✓", "type": "é" * 127},
        {"timestamp": 1_767_225_600.9999996},
        {"timestamp": 1_767_225_600.9999994},
        {"timestamp": 0.0},
        {"headers": {}},
        {"headers": {"nested": {"k": [1, "a"]}, "flag": True, "big": 2**70, "raw": b"\xff"}},
    ],
)
@pytest.mark.parametrize("channel", [1, 7, 65535])
def test_header_frame_matches_pamqp(fields, channel):
    """Whatever the properties, the frame equals pamqp's, on any channel number."""
    values = {"headers": HEADERS, "correlation_id": "corr", "timestamp": 1_767_225_600.25, "type": "ev", **fields}
    message = OutgoingMessage(queue="mail", body=b"{}", **values)  # type: ignore[arg-type]
    assert _header_frame(message, message.message_id, channel, 1234) == _pamqp(
        message, message.message_id, channel, 1234
    )


def test_random_messages_match_pamqp():
    """Random timestamps, ids and sizes all encode as pamqp does."""
    rng = random.Random(11)
    for n in range(300):
        message = OutgoingMessage(
            queue="q",
            body=b"x",
            headers={**HEADERS, "x-queueable-attempt": rng.randrange(1, 9)},
            message_id=f"{rng.getrandbits(128):032x}",
            correlation_id=rng.choice([None, f"c{n}"]),
            timestamp=rng.uniform(0, 4e9),
            type=rng.choice([None, "order.placed"]),
        )
        size = rng.randrange(0, 2**40)
        assert _header_frame(message, message.message_id, 1, size) == _pamqp(message, message.message_id, 1, size)


@pytest.mark.parametrize(
    "fields",
    [{"type": "t" * 256}, {"correlation_id": "c" * 300}, {"content_type": "x" * 256}, {"timestamp": -1.5}],
)
def test_what_pamqp_cannot_encode_fails_the_same_way(fields):
    """A property pamqp cannot encode raises the very exception type pamqp raises."""
    message = OutgoingMessage(queue="q", body=b"", headers={}, **fields)  # type: ignore[arg-type]
    with pytest.raises(Exception) as stock:
        _pamqp(message, message.message_id, 1, 0)
    with pytest.raises(type(stock.value)):
        _header_frame(message, message.message_id, 1, 0)


@pytest.mark.parametrize(
    "change",
    [
        {"x-queueable-attempt": True},  # equal to the cached int 1, another type
        {"x-queueable-attempt": 1.0},
        {"x-queueable-attempt": 2**70},  # beyond AMQP's integers: sent as a string
        {"x-queueable-wire": "1"},
        {"x-queueable-event-version": None},
        {"x-queueable-listener": b"mailer:notify_author"},
        {"x-queueable-extra": {"nested": 1}},
    ],
)
def test_cached_header_entries_stand_in_for_nothing_else(change):
    """With the usual entries cached, a value equal to one of them but of another type, or one AMQP cannot
    carry as it is, still encodes as pamqp does.
    """
    usual = OutgoingMessage(queue="q", body=b"", headers=HEADERS, correlation_id="c", type="ev")
    assert _header_frame(usual, usual.message_id, 1, 9) == _pamqp(usual, usual.message_id, 1, 9)  # now cached
    message = OutgoingMessage(queue="q", body=b"", headers={**HEADERS, **change}, correlation_id="c", type="ev")
    assert _header_frame(message, message.message_id, 1, 9) == _pamqp(message, message.message_id, 1, 9)


@pytest.mark.parametrize(
    "entry",
    [
        {"x-queueable-created-at": "2031-01-02T03:04:05.678+00:00"},  # new with every dispatch
        {"x-queueable-created-at": ""},
        {"note": "ünïcödé ✓ " * 40},  # a long string, several bytes per character
        {"k" * 128: "a key at pamqp's limit"},
        {"k" * 129: "a key pamqp truncates"},
        {"é" * 65: "a key over the limit in bytes only"},
    ],
)
def test_string_entries_not_cached_yet_encode_as_pamqp_does(entry):
    """A string header seen for the first time, whatever its key and text, encodes as pamqp does, and again
    once cached.
    """
    message = OutgoingMessage(queue="q", body=b"", headers={**HEADERS, **entry}, correlation_id="c", type="ev")
    expected = _pamqp(message, message.message_id, 1, 9)
    assert _header_frame(message, message.message_id, 1, 9) == expected
    assert _header_frame(message, message.message_id, 1, 9) == expected


class _Color(enum.Enum):
    RED = 1
    BLUE = 2


@pytest.mark.parametrize(
    "headers",
    [
        {"x-queueable-attempt": 1, 7: b"raw"},  # keys that sort only once amqp_headers made them strings
        {_Color.RED: "a", _Color.BLUE: b"b"},
        {"a": 2**70, None: "x"},
    ],
)
def test_keys_of_mixed_types_encode_as_pamqp_does(headers):
    """Keys that do not sort together as they are still give pamqp's table (amqp_headers turns them into text)."""
    message = OutgoingMessage(queue="q", body=b"", headers=headers)  # type: ignore[arg-type]
    assert _header_frame(message, message.message_id, 1, 0) == _pamqp(message, message.message_id, 1, 0)


class _CaseInsensitive(str):
    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.lower() == other.lower()

    def __hash__(self) -> int:
        return hash(self.lower())


def test_a_key_with_its_own_equality_does_not_stand_in_for_another(monkeypatch):
    """A str subclass key equal to another key is never cached, so it cannot leak its spelling into a header."""
    monkeypatch.setattr(rabbitmq, "_HEADER_ENTRIES", {})
    odd = OutgoingMessage(queue="q", body=b"", headers={_CaseInsensitive("X-Trace"): "abc"})
    plain = OutgoingMessage(queue="q", body=b"", headers={"x-trace": "abc"})
    for message in (odd, plain, odd, plain):
        assert _header_frame(message, message.message_id, 1, 0) == _pamqp(message, message.message_id, 1, 0)
