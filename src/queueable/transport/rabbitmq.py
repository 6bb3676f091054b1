"""The RabbitMQ transport: confirmed publishing, the topology, and the consumer side of ``queueable-consume``.

This is the only module that imports :mod:`aio_pika`. Everything here was checked against RabbitMQ 3.10.8 and
aio-pika 10.2 (see ``integration/test_transport.py`` and ``integration/test_consumer.py``).

Topology
========

One durable direct exchange, and per work queue ``Q`` (the default queue, plus every listener's
``queue_name``) a dead-letter queue and a set of delay queues. No broker plugin is needed::

    dispatch() ── publish: confirmed, mandatory, persistent ──┐
                                                              ▼
               ┌────────── routing key Q ─────────── exchange "queueable" ──── routing key Q.dead ───┐
               │                                  (direct, durable)                                 │
               ▼                                          ▲                                         ▼
    ┌───────────────────────┐  deliver  ┌───────────────────┐ DeadLetter: copy      ┌──────────────────────┐
    │ Q          work queue │ ────────► │ queueable-consume │ published, confirmed, │ Q.dead               │
    │ quorum,               │ ◄── ack ─ │ (Processor.process│ then the original is  │ quorum, no delivery  │
    │ x-delivery-limit = N  │           │  decides)         │ acked                 │ limit, no consumer   │
    └───────────────────────┘           └───────────────────┘                       └──────────────────────┘
         ▲             │                          │ RetryLater: copy published to the            ▲
         │             │                          │ bucket's delay queue (default exchange),     │
         │             │                          ▼ confirmed, then the original is acked        │
         │             │            ┌────────────────────────────────┐                           │
         └─────────────┼─────────── │ Q.delay.<ms>   one per bucket, │                           │
           TTL expired:│            │ x-message-ttl = ms, no consumer│                           │
           back to Q   │            │ x-expires = ms + 1 h           │                           │
                       │            └────────────────────────────────┘                           │
                       └─── delivered N+1 times (a worker kept dying on it): the broker ─────────┘
                            dead-letters it itself, at-least-once; x-death reason "delivery_limit"

- **Work queues** are quorum queues by default (``Settings.queue_type``): durable, replicated in a cluster,
  and ``x-delivery-limit = Settings.delivery_limit`` guards against a message that kills the worker on every
  delivery. Past the limit the *broker* dead-letters it to ``Q.dead`` with ``x-dead-letter-strategy =
  at-least-once`` (which needs ``x-overflow = reject-publish``; there is no max length, so nothing is
  rejected). Such a message carries no ``x-queueable-*`` error headers, only ``x-death`` /
  ``x-first-death-reason = "delivery_limit"``: :func:`dead_reason_of` reports it as
  :attr:`DeadReason.DELIVERY_LIMIT`. With ``queue_type="classic"`` there is no delivery limit (classic queues
  have none); everything else is the same.
- **Dead-letter queues** ``Q.dead`` have the same type and no other arguments (no delivery limit: browsing a
  quorum queue counts as deliveries), and are bound to the exchange with routing key ``Q.dead`` (so a dead
  letter is published like any message; ``mandatory`` makes a missing DLQ a publish error, and the original
  is then requeued, never acked).
- **Delay queues** ``Q.delay.<ms>`` (no plugin, no head-of-line blocking): a queue per work queue and delay
  bucket, with a per-queue ``x-message-ttl``, so every message in it expires in FIFO order and a 1 s retry is
  never held behind a 10 min one. Expired messages dead-letter to ``Q`` through the default exchange
  (at-least-once for quorum delay queues, so a retry is not dropped if ``Q`` is briefly unavailable). They
  are declared on first use by the worker and re-declared at least every 30 min while in use; ``x-expires =
  ttl + 1 h`` deletes a bucket nobody has used for an hour (never one that can still hold a message). Delays
  are rounded *up* to a bucket of a 10-per-decade ladder (10, 13, 16, 20, 25, 32, 40, 50, 64, 80 ms, times 10 …
  up to 6.4e8 ms ≈ 7.4 days): at most +28 % late, never early, and only the few buckets a retry policy
  actually hits are created. A delay of 0 goes straight back to ``Q``. Retried messages are never held
  unacked in worker memory (which would break on RabbitMQ's consumer timeout).

The worker's consuming channel declares the exchange, its queues and their bindings *robustly*: after a
reconnect (even to a node that lost its definitions) or a broker-side consumer cancel (a deleted queue),
aio-pika restores them and consumes again by itself.

Declaring is idempotent: the same name with the same arguments is a no-op. A queue that already exists with
*other* arguments (say classic instead of quorum, or another delivery limit) is a
:class:`~queueable.errors.ConfigurationError` naming the queue and the argument; RabbitMQ cannot change a
queue's arguments in place.

Publishing
==========

``publish()`` sends every message of a call concurrently on one channel in confirm mode and returns only
when the broker has confirmed all of them: persistent (``delivery_mode=2``), ``mandatory`` (unroutable is a
:class:`~queueable.errors.PublishError`, not a silent drop). While the robust connection is down it waits for
it to come back and publishes again, until ``Settings.publish_timeout``; then it raises ``PublishError``. A
message whose confirm was lost with the connection may therefore be published twice (at least once); its
``message_id`` stays the same, so a listener can deduplicate.

aiormq internals
================

On queueable's own channels, the frames of deliveries for the worker's consumers and publisher confirms are
taken straight from the connection's reader (:class:`_Shortcut`, which takes over ``channel.frames.put`` and
``channel._on_confirm_frame``), a publish batch registers one small :class:`_Confirm` per message in
``channel.confirmations`` and awaits one future (:class:`_Batch`), and the worker's consumer replaces aio-pika's
wrapper in ``channel.consumers``. That is why aiormq is pinned to 7.2.x in ``pyproject.toml``; the unit tests
in ``tests/test_rabbitmq_consume.py`` and the integration tests of this transport and the worker pin the
behaviour that relies on it.

Passwords never appear in reprs, log lines or errors raised from here: URLs go through
:func:`queueable.mask_url`, and text from aio-pika/aiormq exceptions is scrubbed before it is re-raised.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import functools
import itertools
import logging
import math
import os
import re
import socket
import ssl
import struct
import time
import typing
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import aiormq.channel
import aiormq.exceptions
import pamqp.frame
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import encode
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from queueable._consumer import DeadReason, dead_letter_queue_for
from queueable._settings import mask_url
from queueable._wire import H_DEAD_REASON, IncomingMessage, OutgoingMessage, new_message_id
from queueable.errors import ConfigurationError, MessageTooLargeError, PublishError, TransportClosedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

    from aio_pika.abc import (
        AbstractIncomingMessage,
        AbstractRobustChannel,
        AbstractRobustConnection,
        AbstractRobustQueue,
    )

    from queueable._settings import Settings

__all__ = [
    "DELAY_INFIX",
    "AckCoalescer",
    "QueueSpec",
    "RabbitMQTransport",
    "amqp_headers",
    "dead_reason_of",
    "delay_bucket_ms",
    "delay_queue_for",
    "delay_queue_spec",
    "delivered_to_incoming",
    "scrub",
    "ssl_context",
    "to_incoming",
    "topology_for",
]

log = logging.getLogger("queueable.rabbitmq")

DELAY_INFIX = ".delay."
#: A delay queue lives this long past its TTL without being (re)declared.
DELAY_QUEUE_GRACE_MS = 3_600_000
#: The worker re-declares a delay queue it uses at least this often (half the grace), renewing its lease.
DELAY_REDECLARE_S = DELAY_QUEUE_GRACE_MS / 2_000
_MANTISSAS = (10, 12.5, 16, 20, 25, 32, 40, 50, 64, 80)
MAX_DELAY_MS = 640_000_000  # about 7.4 days; longer delays are capped to it
#: Delay buckets in milliseconds: 10 per decade from 10 ms to MAX_DELAY_MS.
DELAY_BUCKETS_MS: tuple[int, ...] = tuple(
    sorted({math.ceil(m * 10**k) for k in range(8) for m in _MANTISSAS if m * 10**k <= MAX_DELAY_MS})
)
_RETRY_PAUSE = 0.25  # between publish attempts while the connection recovers


# -- pure helpers (unit-tested in tests/test_rabbitmq_units.py) --------------------------------------


def delay_bucket_ms(delay: float) -> int:
    """The delay bucket (ms) for ``delay`` seconds: the smallest bucket >= delay, 0 for no delay."""
    if not delay > 0:  # also NaN
        return 0
    if delay * 1000 >= MAX_DELAY_MS:  # also infinity, which math.ceil cannot take
        return MAX_DELAY_MS
    ms = math.ceil(delay * 1000 - 1e-6)
    index = bisect.bisect_left(DELAY_BUCKETS_MS, ms)
    return DELAY_BUCKETS_MS[min(index, len(DELAY_BUCKETS_MS) - 1)]


def delay_queue_for(queue: str, bucket_ms: int) -> str:
    """The name of ``queue``'s delay queue for ``bucket_ms``: ``Q.delay.<ms>``."""
    return f"{queue}{DELAY_INFIX}{bucket_ms}"


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One queue of the topology: its name, arguments, and the routing key binding it to the exchange."""

    name: str
    role: str  # "work", "dead" or "delay"
    arguments: dict[str, Any]
    binding: str | None  # routing key on the exchange, None for delay queues (default exchange only)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able description (for ``queueable topology declare --json``)."""
        return {"queue": self.name, "role": self.role, "arguments": self.arguments, "binding": self.binding}


def _dlx_arguments(settings: Settings, target: str) -> dict[str, Any]:
    args: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": target}
    if settings.queue_type == "quorum":
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = "reject-publish"
    return args


def topology_for(settings: Settings, queues: Iterable[str]) -> list[QueueSpec]:
    """Work queue and dead-letter queue specs for ``queues`` (delay queues are declared on first use)."""
    specs: list[QueueSpec] = []
    for queue in dict.fromkeys(queues):
        dead = dead_letter_queue_for(queue)
        work_args: dict[str, Any] = {"x-queue-type": settings.queue_type}
        if settings.queue_type == "quorum":
            work_args["x-delivery-limit"] = settings.delivery_limit
        work_args.update(_dlx_arguments(settings, dead))
        specs.append(QueueSpec(queue, "work", work_args, queue))
        specs.append(QueueSpec(dead, "dead", {"x-queue-type": settings.queue_type}, dead))
    return specs


def delay_queue_spec(settings: Settings, queue: str, bucket_ms: int) -> QueueSpec:
    """The delay queue of ``queue`` for ``bucket_ms``: TTL, dead-letter back to ``queue``, self-expiring."""
    args: dict[str, Any] = {
        "x-queue-type": settings.queue_type,
        "x-message-ttl": bucket_ms,
        "x-expires": bucket_ms + DELAY_QUEUE_GRACE_MS,
    }
    args.update(_dlx_arguments(settings, queue))
    return QueueSpec(delay_queue_for(queue, bucket_ms), "delay", args, None)


def dead_reason_of(headers: Mapping[str, Any]) -> DeadReason | None:
    """Why a message in a dead-letter queue is there.

    The worker's dead letters say so in ``x-queueable-dead-reason``. A message the *broker* dead-lettered
    because it was delivered more than ``x-delivery-limit`` times (a worker kept crashing on it) has no
    queueable headers, only RabbitMQ's ``x-death`` entry with ``reason = "delivery_limit"`` (and
    ``x-first-death-reason`` when that was its first death): that is :attr:`DeadReason.DELIVERY_LIMIT`.
    ``None`` when neither applies.
    """
    raw = headers.get(H_DEAD_REASON)
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str) and raw:
        try:
            return DeadReason(raw)
        except ValueError:
            return None
    if _text(headers.get("x-first-death-reason")) == "delivery_limit":
        return DeadReason.DELIVERY_LIMIT
    deaths = headers.get("x-death")
    if isinstance(deaths, list):
        for death in deaths:
            if isinstance(death, dict) and _text(death.get("reason")) == "delivery_limit":
                return DeadReason.DELIVERY_LIMIT
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


_PLAIN = (str, bool, int, float, Decimal, datetime, type(None))
_INT64 = 2**63


def amqp_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """``headers`` as an AMQP field table: values AMQP cannot carry become strings.

    Returns ``headers`` itself when it needs no change (the usual case), so the hot path does not copy.
    """
    for value in headers.values():
        if not isinstance(value, _PLAIN) or (type(value) is int and not -_INT64 <= value < _INT64):
            break
    else:
        return headers if isinstance(headers, dict) else dict(headers)
    return {str(key): _amqp_value(value) for key, value in headers.items()}


def _amqp_value(value: Any) -> Any:  # noqa: PLR0911 - one return per AMQP type is the clearest
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else str(value)
    if isinstance(value, (str, float, Decimal, datetime, bytearray)):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return bytearray(value)
    if isinstance(value, dict):
        return {str(k): _amqp_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_amqp_value(v) for v in value]
    return str(value)


#: Encoded header entries (key and value, as pamqp writes them), per key, by value: every message of a listener
#: repeats the same wire version, listener, event, version and attempt. Only keys that are exactly ``str`` (a
#: subclass may define its own equality) and values that are exactly ``str`` or ``int`` (no ``bool``), which
#: never equal one another. A key holds at most _HEADER_VALUES_MAX values (a timestamp header has a new one with
#: every dispatch, and must not push the others out); the table at most _HEADER_KEYS_MAX keys. Each is cleared
#: when full.
_HEADER_ENTRIES: dict[str, dict[str | int, bytes]] = {}
_HEADER_VALUES_MAX = 64
_HEADER_KEYS_MAX = 256


def _remember(key: str, value: str | int, piece: bytes) -> None:
    """Cache the encoded entry ``key: value``."""
    values = _HEADER_ENTRIES.get(key)
    if values is None:
        if len(_HEADER_ENTRIES) >= _HEADER_KEYS_MAX:
            _HEADER_ENTRIES.clear()
        values = _HEADER_ENTRIES[key] = {}
    elif len(values) >= _HEADER_VALUES_MAX:
        values.clear()
    values[value] = piece


def _field_table(headers: Mapping[str, Any]) -> bytes:
    """pamqp's ``encode.field_table(headers)``, byte for byte, with string and int entries cached."""
    entries = _HEADER_ENTRIES
    parts = []
    for key, value in sorted(headers.items()):  # pamqp sorts the keys too
        kind = type(value)
        if (kind is str or kind is int) and type(key) is str:
            values = entries.get(key)
            piece = values.get(value) if values is not None else None
            if piece is None:
                piece = encode.field_table({key: value})[4:]  # pamqp's own encoding, without the length
                _remember(key, value, piece)
        else:
            piece = encode.field_table({key: value})[4:]
        parts.append(piece)
    table = b"".join(parts)
    return len(table).to_bytes(4, "big") + table


def _header_table(headers: Mapping[str, Any]) -> bytes:
    """``_field_table(amqp_headers(headers))``, in one pass when every entry is a string or an int.

    Cached entries were encoded as :func:`_field_table` encodes them, after :func:`amqp_headers` (a string or
    an int that AMQP carries as it is), so a hit needs no conversion. A string entry that is not cached yet (a
    timestamp, which changes with every dispatch) is encoded here, as pamqp does it; anything else takes the
    general path.
    """
    try:
        items = sorted(headers.items())
    except TypeError:  # keys that do not sort together; amqp_headers may turn them into strings that do
        return _field_table(amqp_headers(headers))
    entries = _HEADER_ENTRIES
    parts = []
    for key, value in items:
        kind = type(value)
        if type(key) is not str or (kind is not str and kind is not int):
            return _field_table(amqp_headers(headers))
        values = entries.get(key)
        piece = values.get(value) if values is not None else None
        if piece is None:
            piece = _string_entry(key, value) if kind is str else None
            if piece is None:
                return _field_table(amqp_headers(headers))
            _remember(key, value, piece)
        parts.append(piece)
    table = b"".join(parts)
    return len(table).to_bytes(4, "big") + table


def _string_entry(key: str, value: str) -> bytes | None:
    """pamqp's encoding of the table entry ``key: value`` (both exactly ``str``), or ``None`` where pamqp does
    more than the plain case (a key over 128 bytes, which pamqp truncates).
    """
    name = key.encode()
    data = value.encode()
    if len(name) > 128 or len(data) > 0xFFFFFFFF:  # noqa: PLR2004 - pamqp's limits on keys and long strings
        return None
    return _BYTE[len(name)] + name + b"S" + len(data).to_bytes(4, "big") + data


_SHORTSTR, _TABLE, _OCTET, _TIMESTAMP = range(4)
_KINDS = {"shortstr": _SHORTSTR, "table": _TABLE, "octet": _OCTET, "timestamp": _TIMESTAMP}
#: (name, flag bit, AMQP type) of every ``Basic.Properties`` field, in pamqp's (and the wire's) order.
_PROPERTY_FIELDS = tuple(
    (name, Basic.Properties.flags[name], _KINDS[Basic.Properties.amqp_type(name)])
    for name in Basic.Properties.__slots__
)
_BYTE = tuple(bytes((n,)) for n in range(256))
_TIMESTAMP_STRUCT = struct.Struct(">Q")


class _Properties(Basic.Properties):
    """``Basic.Properties`` whose ``marshal()`` writes the same bytes about 5x faster (under 2 µs instead of
    12 µs for queueable's properties): the header table through :func:`_field_table`, short strings, octets and
    UTC timestamps inline; any other value (a string over 255 bytes, say) goes through pamqp's own encoder, so it
    fails the same way. ``tests/test_rabbitmq_properties.py`` pins the bytes to pamqp's.

    No ``__slots__`` of its own: pamqp's ``len()``, ``in`` and iteration read ``self.__slots__``, which must stay
    the parent's list (an empty one would make the object falsy, and ``properties or default`` drop it).
    """

    def marshal(self) -> bytes:
        flags = 0
        parts = []
        for name, flag, kind in _PROPERTY_FIELDS:
            value = getattr(self, name)
            if value is None or value == "":
                continue
            flags |= flag
            piece: bytes | None = None
            if kind == _SHORTSTR:
                if type(value) is str:
                    data = value.encode()
                    if len(data) <= 255:  # noqa: PLR2004 - the AMQP short string limit
                        piece = _BYTE[len(data)] + data
            elif kind == _TABLE:
                piece = _field_table(value)
            elif kind == _TIMESTAMP:
                if type(value) is datetime and value.tzinfo is UTC:
                    piece = _TIMESTAMP_STRUCT.pack(int(value.timestamp()))
            elif type(value) is int and 0 <= value <= 255:  # noqa: PLR2004 - an octet
                piece = _BYTE[value]
            parts.append(self.encode_property(name, value) if piece is None else piece)
        return (flags & 0xFFFE).to_bytes(2, "big") + b"".join(parts)  # all 14 flags fit in one 16-bit word


def _properties(message: OutgoingMessage) -> Basic.Properties:
    return _Properties(
        content_type=message.content_type,
        delivery_mode=2,
        headers=amqp_headers(message.headers),
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        timestamp=datetime.fromtimestamp(message.timestamp, UTC),
        message_type=message.type,
    )


_FRAME_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
_HEADER_PREFIX = struct.Struct(">HxxQH")  # class id (Basic), weight 0, body size, property flags
_FRAME_END = b"\xce"
_FRAME_OVERHEAD = _FRAME_HEAD.size + len(_FRAME_END)  # 8: what a frame adds to its payload
_FLAGS_FIXED = 0x2000 | 0x1000 | 0x0080 | 0x0040  # headers, delivery_mode, message_id, timestamp
_DELIVERY_PERSISTENT = b"\x02"


def _short(value: str) -> bytes | None:
    data = value.encode()
    return _BYTE[len(data)] + data if len(data) <= 255 else None  # noqa: PLR2004 - AMQP short string limit


def _header_frame(message: OutgoingMessage, message_id: str, number: int, body_size: int) -> bytes:
    """The content header frame of ``message`` on channel ``number``: exactly
    ``pamqp.frame.marshal(ContentHeader(0, body_size, _properties(message)), number)`` (with ``message_id``),
    written straight from the message, without the properties object, ``datetime`` or pamqp's generic encoder.
    Anything unusual (a string over 255 bytes, a timestamp before 1970 or a hair below a full second) goes
    through that pamqp path, which also raises the same ``TypeError`` for what cannot be encoded.
    """
    timestamp = message.timestamp
    second = int(timestamp) if timestamp >= 0 else -1
    content_type, correlation_id, kind = message.content_type, message.correlation_id, message.type
    parts = [b"", _header_table(message.headers), _DELIVERY_PERSISTENT]
    flags = _FLAGS_FIXED
    ok = second >= 0 and timestamp - second < 0.9999995  # noqa: PLR2004 - datetime would round up to +1 s
    if ok and content_type is not None and content_type != "":
        flags |= 0x8000
        piece = _short(content_type) if type(content_type) is str else None
        parts[0] = piece or b""
        ok = piece is not None
    if ok and correlation_id is not None and correlation_id != "":
        flags |= 0x0400
        piece = _short(correlation_id) if type(correlation_id) is str else None
        parts.append(piece or b"")
        ok = piece is not None
    piece = _short(message_id) if type(message_id) is str else None
    ok = ok and piece is not None
    parts += (piece or b"", _TIMESTAMP_STRUCT.pack(second if ok else 0))
    if ok and kind is not None and kind != "":
        flags |= 0x0020
        piece = _short(kind) if type(kind) is str else None
        parts.append(piece or b"")
        ok = piece is not None
    if not ok:
        properties = _properties(message)
        properties.message_id = message_id
        return pamqp.frame.marshal(ContentHeader(0, body_size, properties), number)
    payload = _HEADER_PREFIX.pack(60, body_size, flags) + b"".join(parts)
    return _FRAME_HEAD.pack(2, number, len(payload)) + payload + _FRAME_END


def delivered_to_incoming(message: DeliveredMessage, queue: str) -> IncomingMessage:
    """An aiormq delivery as :class:`~queueable.IncomingMessage`, straight from pamqp's decoded properties."""
    properties = message.header.properties
    stamp = properties.timestamp
    if stamp is not None and stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)  # AMQP timestamps are seconds since the epoch, UTC
    headers = properties.headers
    return IncomingMessage(
        queue=queue,
        body=message.body,
        headers=headers if type(headers) is dict else dict(headers or {}),
        message_id=properties.message_id,
        correlation_id=properties.correlation_id,
        timestamp=stamp.timestamp() if stamp is not None else None,
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        type=properties.message_type,
        redelivered=bool(message.delivery.redelivered),  # type: ignore[union-attr]
    )


def to_incoming(message: AbstractIncomingMessage, queue: str) -> IncomingMessage:
    """An aio-pika delivery as the transport-independent :class:`~queueable.IncomingMessage`."""
    stamp = message.timestamp
    if stamp is not None and stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)  # AMQP timestamps are seconds since the epoch, UTC
    headers = message.headers
    return IncomingMessage(
        queue=queue,
        body=message.body,
        headers=headers if isinstance(headers, dict) else dict(headers or {}),
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        timestamp=stamp.timestamp() if stamp is not None else None,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        type=message.type,
        redelivered=bool(message.redelivered),
    )


_CREDENTIALS = re.compile(r"(amqps?://[^:/@\s]*:)[^@\s]*@")


def scrub(text: str, url: str | None = None) -> str:
    """``text`` without credentials: ``user:pass@`` in any AMQP URL, and ``url``'s password anywhere."""
    text = _CREDENTIALS.sub(r"\1***@", text)
    password = _password(url)
    if password:
        text = text.replace(password, "***")
    return text


def _password(url: str | None) -> str | None:
    if not url:
        return None
    with contextlib.suppress(ValueError):
        return aio_pika.connection.make_url(url).password
    return None


def _describe(exc: BaseException, url: str | None) -> str:
    text = str(exc) or type(exc).__qualname__
    return scrub(f"{type(exc).__name__}: {text}", url)


def _safe_cause(exc: BaseException, url: str | None) -> BaseException | None:
    """``exc`` if its text holds no secret, else ``None`` (so ``raise … from`` cannot leak it)."""
    password = _password(url)
    if not password:
        return exc
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if password in str(current) or password in repr(current.args):
            return None
        current = current.__cause__ or current.__context__
    return exc


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for an ``amqps://`` URL, from ``Settings.tls``.

    Keys: ``cafile``, ``capath``, ``certfile``, ``keyfile``, ``password`` (of the key), ``verify`` (default
    true; false disables certificate *and* host name checks, for tests only), ``server_hostname`` is not needed
    (the URL's host is used).
    """
    if settings.scheme != "amqps":
        return None
    tls = settings.tls
    unknown = set(tls) - {"cafile", "capath", "certfile", "keyfile", "password", "verify"}
    if unknown:
        msg = f"unknown TLS settings: {', '.join(sorted(unknown))}"
        raise ConfigurationError(msg)
    try:
        context = ssl.create_default_context(cafile=tls.get("cafile"), capath=tls.get("capath"))
        if tls.get("certfile"):
            context.load_cert_chain(tls["certfile"], tls.get("keyfile"), tls.get("password"))
    except (OSError, ssl.SSLError) as exc:
        msg = f"invalid TLS settings: {exc}"
        raise ConfigurationError(msg) from exc
    if tls.get("verify", True) in (False, "0", "false", "no", "off"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# -- the transport ------------------------------------------------------------------------------------

#: Failures after which the same publish is tried again once the connection is back.
_TRANSIENT: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ConnectionClosed,
    aiormq.exceptions.ChannelClosed,
    aiormq.exceptions.AMQPConnectionError,
    ConnectionError,
    OSError,
)


class _FrameTooLargeError(ValueError):
    """A message's properties and headers do not fit in one frame of this connection (AMQP cannot split them)."""


#: Failures that publishing again would not cure: returned by the broker (unroutable: aiormq's PublishError),
#: or a header value AMQP cannot encode. A broker *nack* (DeliveryError) is retried until the publish timeout:
#: without a max-length it means a transient condition, e.g. a quorum queue without a leader yet after a restart.
_PERMANENT: tuple[type[BaseException], ...] = (aiormq.exceptions.PublishError, TypeError, _FrameTooLargeError)
_PUBLISH_FAILURES: tuple[type[BaseException], ...] = (*_PERMANENT, aiormq.exceptions.DeliveryError, *_TRANSIENT)
_CONNECT_FAILURES: tuple[type[BaseException], ...] = (*_TRANSIENT, TimeoutError)
#: Failures while connecting and declaring that a retry may cure (aio-pika raises RuntimeError for a channel
#: requested while the robust connection is reconnecting).
_SETUP_FAILURES: tuple[type[BaseException], ...] = (*_TRANSIENT, RuntimeError)
#: Set while a retrying setup runs in this context, so that setups nested in it (connect() inside the start of
#: consuming, declarations inside connect()) run once and leave the retrying to the outermost.
_SETTING_UP: contextvars.ContextVar[bool] = contextvars.ContextVar("queueable_setting_up", default=False)


def _conflicting_queue(name: str, exc: BaseException) -> ConfigurationError:
    """The error for a queue that exists with other arguments than queueable declares it with."""
    msg = (
        f"queue {name!r} already exists with other arguments than queueable's "
        f"({exc.args[0] if exc.args else exc}). RabbitMQ cannot change them: drain and "
        f"delete the queue, or configure queue_type / delivery_limit to match it"
    )
    return ConfigurationError(msg)


def open_refused(exc: BaseException, url: str) -> str | None:
    """The message for a broker that closed the connection instead of opening it (``None``: not that).

    RabbitMQ answers ``connection.open`` with ``connection.close`` (NOT_ALLOWED) for a virtual host that does
    not exist or that the user may not use; aiormq 7.2 reports it as an ``InvalidFrameError`` that names the
    frame but not the broker's reason.
    """
    if not isinstance(exc, aiormq.exceptions.InvalidFrameError) or "Connection.OpenOk" not in str(exc):
        return None
    vhost = unquote(urlsplit(url).path[1:]) or "/"
    return (
        f"RabbitMQ at {mask_url(url)} refused to open the connection: the virtual host {vhost!r} does not "
        "exist, is not running, or the user may not use it (the broker's log says which)"
    )


class _CredentialsRefusedError(ConnectionRefusedError):
    """The broker refused the login: retrying will not help."""


class _UnreachableError(ConnectionError):
    """No connection within ``Settings.connect_timeout``."""


class _Deadlines:
    """The publish deadlines of one transport, kept by a single timer instead of one per publish.

    Each publish enters ``asyncio.timeout(None)`` (no timer of its own) and registers the scope here with its
    deadline. One ``loop.call_at`` handle, set for the earliest deadline, expires every scope that is past its
    deadline through ``Timeout.reschedule(now)``, so the publish ends exactly as ``asyncio.timeout(timeout)``
    would end it (``TimeoutError`` at the ``async with``, an outer cancellation still propagating). A publish
    that finishes first just unregisters. With a constant ``publish_timeout`` the timer fires about once per
    timeout period instead of a timer being scheduled and cancelled for every publish, which cost about 15 µs
    of client CPU per dispatch (a heap of cancelled timer handles in the event loop).
    """

    def __init__(self) -> None:
        self._scopes: dict[asyncio.Timeout, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, scope: asyncio.Timeout, timeout: float) -> None:
        """Expire ``scope`` (entered, in the running task) ``timeout`` seconds from now unless forgotten first."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a transport used from another event loop: start over there
            if self._timer is not None:
                self._timer.cancel()
            self._scopes.clear()
            self._timer, self._loop = None, loop
        deadline = loop.time() + timeout
        self._scopes[scope] = deadline
        timer = self._timer
        if timer is None or deadline < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._expire)

    def forget(self, scope: asyncio.Timeout) -> None:
        """The publish of ``scope`` is over (before its deadline or not)."""
        self._scopes.pop(scope, None)

    def _expire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        due = [scope for scope, deadline in self._scopes.items() if deadline <= now]
        for scope in due:
            del self._scopes[scope]
            scope.reschedule(now)  # cancels its task on the next loop iteration, as an expired asyncio.timeout
        if self._scopes:
            self._timer = loop.call_at(min(self._scopes.values()), self._expire)


class RabbitMQTransport:
    """Publishes queued listeners' messages to RabbitMQ, and consumes them for ``queueable-consume``.

    ::

        transport = RabbitMQTransport(Settings(url="amqp://guest:guest@localhost/"), queues=["queueable"])
        await transport.publish(messages)   # connects and declares the topology on first use
        await transport.close()

    ``queues`` are the work queues whose topology (queue, dead-letter queue, bindings) is declared before the
    first publish, once per transport; :meth:`add_queue` adds one later (declared before the next publish).
    Messages for any other queue are published as they are and fail as unroutable unless something else
    declared that queue.
    """

    def __init__(self, settings: Settings, *, queues: Iterable[str] = ()) -> None:
        if settings.scheme not in ("amqp", "amqps"):
            msg = f"RabbitMQTransport needs an amqp:// or amqps:// URL, got {mask_url(settings.url)}"
            raise ConfigurationError(msg)
        self.settings = settings
        self.queues = list(dict.fromkeys(queues))
        self._url = settings.url
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._consume_channel: AbstractRobustChannel | None = None
        self._consumers: list[tuple[AbstractRobustQueue, str]] = []
        self._acks: AckCoalescer | None = None
        self._ack_batch = 1
        self._connect_lock = asyncio.Lock()
        self._declare_lock = asyncio.Lock()
        self._declared: set[str] = set()  # work queues whose topology this process declared
        self._added: set[str] = set()  # work queues added after construction (add_queue)
        self._delay_declared: dict[str, float] = {}  # delay queue name -> monotonic time of its declaration
        self._closed = False
        self._tags = itertools.count(1)
        self._deadlines = _Deadlines()
        self._underlay: aiormq.Channel | None = None  # the publishing channel's current aiormq channel

    def add_queue(self, name: str) -> None:
        """Declare the topology of work queue ``name`` too, before the next publish (``App`` calls this when a
        listener with a new ``queue_name`` is registered after the transport was created).
        """
        if name not in self.queues:
            self.queues.append(name)
            self._added.add(name)

    # -- connection --------------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """Whether the connection is currently up."""
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    async def connect(self) -> None:
        """Connect (robustly: it reconnects by itself) and declare the topology of ``queues``; idempotent.

        Retries a refused or dropped connection until ``Settings.connect_timeout``; bad credentials fail at
        once. Raises ``ConnectionError`` (scrubbed of credentials) when the broker cannot be reached.
        """
        if self._closed:
            raise TransportClosedError("the RabbitMQ transport is closed")
        if self._channel is not None and self._declared.issuperset(self.queues):
            return
        async with self._connect_lock:
            await self._retrying_setup(self._connect_once, "cannot set up RabbitMQ at")

    async def _connect_once(self) -> None:
        if self._channel is None:
            await self._open()
        if not self._declared.issuperset(self.queues):
            await self._declare_queues()

    async def _retrying_setup(self, attempt: Callable[[], Awaitable[None]], failure: str) -> None:
        """Run ``attempt`` until it succeeds or ``Settings.connect_timeout`` has passed (then ConnectionError).

        A node that is still starting answers INTERNAL_ERROR to quorum declarations and drops the connection;
        while the robust connection reconnects, aio-pika raises RuntimeError ("... closed") for a new channel.
        Both are tried again; refused credentials, refused access (``ConfigurationError``) and an unreachable
        broker are not. Inside another retrying setup (connect() called while consuming starts, say) the attempt
        runs once: the outer loop retries, under one deadline.
        """
        if _SETTING_UP.get():
            await attempt()
            return
        token = _SETTING_UP.set(True)
        try:
            deadline = time.monotonic() + self.settings.connect_timeout
            while True:
                try:
                    await attempt()
                except (_CredentialsRefusedError, _UnreachableError):
                    raise
                except aiormq.exceptions.ChannelAccessRefused as exc:
                    msg = f"RabbitMQ at {mask_url(self._url)} refused access: {_describe(exc, self._url)}"
                    raise ConfigurationError(msg) from _safe_cause(exc, self._url)
                except _SETUP_FAILURES as exc:
                    if self._closed or time.monotonic() >= deadline:
                        msg = f"{failure} {mask_url(self._url)}: {_describe(exc, self._url)}"
                        raise ConnectionError(msg) from _safe_cause(exc, self._url)
                    log.debug(
                        "%s %s failed, retrying: %s", failure, mask_url(self._url), scrub(str(exc), self._url)
                    )
                    await asyncio.sleep(_RETRY_PAUSE)
                else:
                    return
        finally:
            _SETTING_UP.reset(token)

    async def _open(self) -> None:
        deadline = time.monotonic() + self.settings.connect_timeout
        while True:
            try:
                connection = await aio_pika.connect_robust(
                    self._url,
                    ssl_context=ssl_context(self.settings),
                    timeout=self.settings.connect_timeout,
                    client_properties={"connection_name": f"queueable {socket.gethostname()} pid {os.getpid()}"},
                    reconnect_interval=1,
                )
                break
            except aiormq.exceptions.ProbableAuthenticationError as exc:
                msg = f"RabbitMQ at {mask_url(self._url)} refused the credentials: {_describe(exc, self._url)}"
                raise _CredentialsRefusedError(msg) from _safe_cause(exc, self._url)
            except aiormq.exceptions.InvalidFrameError as exc:
                refused = open_refused(exc, self._url or "")
                if refused is None:
                    raise
                # Retried like an unreachable broker: a vhost can also be down for a moment (a node starting).
                if time.monotonic() >= deadline:
                    raise _UnreachableError(refused) from None
                log.debug("%s; retrying", refused)
                await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
            except _CONNECT_FAILURES as exc:
                if time.monotonic() >= deadline:
                    msg = f"cannot connect to RabbitMQ at {mask_url(self._url)}: {_describe(exc, self._url)}"
                    raise _UnreachableError(msg) from _safe_cause(exc, self._url)
                log.debug("connection to %s failed, retrying: %s", mask_url(self._url), exc)
                await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
        connection.reconnect_callbacks.add(self._on_reconnect)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self._channel = channel
        log.debug("connected to %s", mask_url(self._url))

    def _on_reconnect(self, *_: Any) -> None:
        # The broker may have lost non-replicated state (a fresh node): declare again before the next publish.
        log.info("reconnected to %s", mask_url(self._url))
        self._declared.clear()
        self._delay_declared.clear()

    async def close(self) -> None:
        """Close the connection; publishing afterwards raises ``TransportClosedError``. Idempotent."""
        self._closed = True
        acks, self._acks = self._acks, None
        if acks is not None:  # acks still waiting to be written go out before the connection closes
            with contextlib.suppress(Exception):
                await acks.drain()
        connection, self._connection = self._connection, None
        self._channel = self._consume_channel = None
        self._underlay = None
        self._consumers.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    # -- topology ----------------------------------------------------------------------------------

    async def _declare_queues(self) -> None:
        """Declare the topology of ``queues`` not declared yet.

        A queue added at run time (:meth:`add_queue`) is declared on its own: if it exists with other arguments
        (``ConfigurationError``), it is logged and dropped, so that publishing to every other queue goes on
        (its own messages then fail with ``PublishError`` as unroutable, unless something else bound that
        routing key). The queues given at construction raise, as before any publish.
        """
        missing = [name for name in self.queues if name not in self._declared]
        await self.declare_topology([name for name in missing if name not in self._added])
        for name in missing:
            if name not in self._added:
                continue
            try:
                await self.declare_topology([name])
            except ConfigurationError as exc:
                self.queues.remove(name)
                self._added.discard(name)
                log.error(  # noqa: TRY400 - the reason is the message; a traceback would be noise
                    "cannot declare queue %r, registered at run time; its messages will fail: %s", name, exc
                )

    async def declare_topology(self, queues: Iterable[str] | None = None) -> list[QueueSpec]:
        """Declare the exchange and, for each work queue, the queue, its dead-letter queue and bindings.

        Idempotent. Returns what was declared. A queue that exists with other arguments raises
        ``ConfigurationError``.
        """
        names = list(dict.fromkeys(self.queues if queues is None else queues))
        specs = topology_for(self.settings, names)
        await self._retrying_setup(
            functools.partial(self._declare, specs, exchange=True), "cannot declare queueable's queues on"
        )
        self._declared.update(names)
        return specs

    async def _declare(self, specs: Sequence[QueueSpec], *, exchange: bool) -> None:
        connection = await self._require_connection()
        async with self._declare_lock:
            # A channel of its own: a failed declaration closes the channel, and must not touch the publisher.
            # Awaited inside the try: a channel that fails to open is still closed, so that aio-pika's robust
            # connection (which tracks it from creation) does not reopen it after a reconnect.
            channel = connection.channel(publisher_confirms=False)
            try:
                await channel
                if exchange:
                    await channel.declare_exchange(
                        self.settings.exchange, aio_pika.ExchangeType.DIRECT, durable=True, robust=False
                    )
                for spec in specs:
                    try:
                        queue = await channel.declare_queue(
                            spec.name, durable=True, arguments=spec.arguments, robust=False
                        )
                    except aiormq.exceptions.ChannelPreconditionFailed as exc:
                        raise _conflicting_queue(spec.name, exc) from None
                    if spec.binding is not None:
                        await queue.bind(self.settings.exchange, spec.binding, robust=False)
            finally:
                # Always close, even when the broker already did (a failed declaration): closing a robust
                # channel is what stops aio-pika from reopening it in the background.
                with contextlib.suppress(Exception):
                    await channel.close()

    async def _require_connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            await self.connect()
        assert self._connection is not None
        return self._connection

    # -- publishing --------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Publish ``messages`` to the exchange; return when the broker confirmed every one of them.

        Raises :class:`~queueable.errors.PublishError` (with the ``message_ids`` concerned) when the broker
        nacks or cannot route a message, or when they are not all confirmed within
        ``Settings.publish_timeout`` (connection down the whole time, say).
        """
        if not messages:
            return
        await self._publish(self.settings.exchange, messages, None)

    async def publish_retry(self, message: OutgoingMessage, delay: float) -> None:
        """Publish ``message`` so that it reaches its work queue after ``delay`` seconds (rounded up to a
        bucket); returns once it is confirmed in the delay queue.
        """
        bucket = delay_bucket_ms(delay)
        if bucket == 0:
            await self._publish(self.settings.exchange, (message,), None)
            return
        spec = delay_queue_spec(self.settings, message.queue, bucket)
        try:
            await self._publish("", (message,), spec)
        except PublishError:
            if spec.name not in self._delay_declared:
                raise
            # Declared earlier but gone since (deleted by hand, or a fresh node): declare again, once.
            del self._delay_declared[spec.name]
            await self._publish("", (message,), spec)

    async def _publish(
        self, exchange: str, messages: Sequence[OutgoingMessage], delay_spec: QueueSpec | None
    ) -> None:
        if self._closed:
            raise TransportClosedError("the RabbitMQ transport is closed")
        timeout = self.settings.publish_timeout
        last_error: list[BaseException] = []
        try:
            # One deadline for the whole call (connecting, declaring, waiting for a reconnect, the confirms),
            # kept by a timer shared with every other publish: see _Deadlines.
            async with asyncio.timeout(None) as scope:
                self._deadlines.watch(scope, timeout)
                try:
                    ready = self._channel is not None and self._declared.issuperset(self.queues)
                    if delay_spec is not None or not ready:
                        await self._prepare(delay_spec, last_error)
                    await self._publish_confirmed(
                        exchange, messages, delay_spec.name if delay_spec else None, last_error
                    )
                finally:
                    self._deadlines.forget(scope)
        except TimeoutError:
            names = ", ".join(sorted({m.queue for m in messages}))
            state = "" if self.is_connected else f" (no connection to {mask_url(self._url)})"
            if last_error:
                state += f" (last error: {_describe(last_error[-1], self._url)})"
            msg = f"{len(messages)} message(s) for {names} not confirmed within {timeout:g} s{state}"
            raise PublishError(msg, message_ids=[m.message_id for m in messages]) from None
        except (ConnectionError, aiormq.exceptions.AMQPError) as exc:
            if self._closed:
                raise TransportClosedError("the RabbitMQ transport is closed") from None
            msg = f"cannot publish to {mask_url(self._url)}: {_describe(exc, self._url)}"
            raise PublishError(msg, message_ids=[m.message_id for m in messages]) from _safe_cause(exc, self._url)

    async def _prepare(self, delay_spec: QueueSpec | None, errors: list[BaseException]) -> None:
        """Connect and declare what this publish needs, retrying connection trouble (a broker that is down or
        still starting answers INTERNAL_ERROR or drops the connection) until the caller's timeout. Refused
        credentials and conflicting queue arguments are not retried.
        """
        while True:
            try:
                if self._channel is None or not self._declared.issuperset(self.queues):
                    await self.connect()
                if delay_spec is not None:
                    await self._ensure_delay_queue(delay_spec)
            except _CredentialsRefusedError:
                raise
            except _SETUP_FAILURES as exc:
                if self._closed:
                    raise
                errors[:] = [exc]
                log.debug("connecting or declaring failed, retrying: %s", scrub(str(exc), self._url))
                await asyncio.sleep(_RETRY_PAUSE)
            else:
                return

    async def _ensure_delay_queue(self, spec: QueueSpec) -> None:
        declared = self._delay_declared.get(spec.name)
        now = time.monotonic()
        if declared is not None and now - declared < DELAY_REDECLARE_S:
            return
        await self._declare((spec,), exchange=False)
        self._delay_declared[spec.name] = now

    async def _publish_confirmed(
        self,
        exchange: str,
        messages: Sequence[OutgoingMessage],
        routing_key: str | None,
        errors: list[BaseException],
    ) -> None:
        pending: Sequence[OutgoingMessage] = messages
        failed: list[tuple[OutgoingMessage, BaseException]] = []  # refused for good; the rest is retried first
        while True:
            underlay = self._underlay
            if underlay is None or underlay.is_closed or not self.is_connected:
                underlay = await self._fresh_underlay()
                if underlay is None:
                    continue
            results = await _publish_batch(underlay, exchange, routing_key, pending)
            again: list[OutgoingMessage] = []
            for message, error in zip(pending, results, strict=True):
                if error is None:
                    continue
                if isinstance(error, _PERMANENT):
                    failed.append((message, error))
                else:
                    again.append(message)
                    errors[:] = [error]
            if not again:
                # The others are confirmed, so the error's message_ids are exactly the messages not published
                # (an outbox relay deletes the rest).
                if failed:
                    raise self._publish_error(failed, exchange, routing_key)
                return
            log.debug("%d publish(es) nacked or cut by a connection failure, retrying", len(again))
            pending = again
            await asyncio.sleep(_RETRY_PAUSE)

    async def _fresh_underlay(self) -> aiormq.Channel | None:
        """The publishing channel's aiormq channel, once the robust connection is (back) up; ``None`` after a
        pause if it went away meanwhile (the caller tries again, within its deadline).
        """
        channel = self._channel
        if channel is None:
            raise TransportClosedError("the RabbitMQ transport is closed")
        try:
            # Waits while the robust connection recovers; the concrete aiormq.Channel takes wait=False.
            underlay = typing.cast("aiormq.Channel", await channel.get_underlay_channel())
        except _TRANSIENT:
            await asyncio.sleep(_RETRY_PAUSE)
            return None
        self._underlay = underlay
        _Shortcut.on(underlay)
        return underlay

    def _publish_error(
        self, failed: list[tuple[OutgoingMessage, BaseException]], exchange: str, routing_key: str | None
    ) -> PublishError:
        message, error = failed[0]
        key = routing_key or message.queue
        if isinstance(error, aiormq.exceptions.PublishError):
            where = f"exchange {exchange!r}" if exchange else "the default exchange"
            reason = f"unroutable: no queue is bound to {where} with routing key {key!r}"
            if not routing_key:
                reason += " (declare it: start the worker, or run `queueable topology declare APP`)"
        elif isinstance(error, _FrameTooLargeError):
            reason = f"it is too large: {error}"
        else:
            reason = f"it cannot be encoded ({_describe(error, self._url)})"
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        msg = f"message {message.message_id} for {key!r} not published: {reason}{more}"
        kind = MessageTooLargeError if all(isinstance(e, _FrameTooLargeError) for _, e in failed) else PublishError
        exc = kind(msg, message_ids=[m.message_id for m, _ in failed])
        exc.__cause__ = _safe_cause(error, self._url)
        return exc

    # -- consuming (for queueable._worker) ---------------------------------------------------------

    async def start_consuming(self, queues: Sequence[str], *, prefetch: int, deliver: Callable[..., None]) -> None:
        """Consume ``queues`` on one channel with ``prefetch`` unacked deliveries at most.

        ``deliver(incoming, token)`` is called for every delivery, on the event loop; ``token`` is what
        :meth:`ack` and :meth:`nack` take. Consumers are restored by the robust connection after a reconnect.

        A broker that is still starting (it closes the connection with INTERNAL_ERROR while its quorum queues
        come up) or drops the connection meanwhile is retried from scratch until ``Settings.connect_timeout``,
        as :meth:`connect` does; then ``ConnectionError``.
        """
        await self._retrying_setup(
            functools.partial(self._start_consuming, queues, prefetch=prefetch, deliver=deliver),
            "cannot consume from RabbitMQ at",
        )

    async def _start_consuming(
        self, queues: Sequence[str], *, prefetch: int, deliver: Callable[..., None]
    ) -> None:
        """One attempt of :meth:`start_consuming`; on failure its channel is closed and nothing stays behind."""
        connection = await self._require_connection()
        channel = connection.channel(publisher_confirms=False)  # opened inside the try (see _declare)
        consumers: list[tuple[AbstractRobustQueue, str]] = []
        self._ack_batch = max(prefetch // 4, 1)  # a quarter of the prefetch window waits for its ack at most
        try:
            await channel
            await channel.set_qos(prefetch_count=prefetch)
            host = socket.gethostname()
            specs = {spec.name: spec for spec in topology_for(self.settings, queues)}
            # Declared robustly on the consuming channel, so that the robust connection restores the exchange,
            # the queue *and its binding* before re-consuming (after a reconnect to a wiped node, or a deleted
            # queue).
            exchange = await channel.declare_exchange(
                self.settings.exchange, aio_pika.ExchangeType.DIRECT, durable=True
            )
            for name in queues:
                try:
                    queue = await channel.declare_queue(name, durable=True, arguments=specs[name].arguments)
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    raise _conflicting_queue(name, exc) from None
                await queue.bind(exchange, name)
                tag = f"queueable.{host}.{os.getpid()}.{next(self._tags)}.{name}"
                consumer = _Consumer(name, tag, deliver, self._track)
                await queue.consume(consumer.on_message, consumer_tag=tag)
                consumer.install(await channel.get_underlay_channel())
                consumers.append((queue, tag))
        except BaseException:
            # Closing the channel cancels what it consumed and stops aio-pika from restoring it later.
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        self._consume_channel = channel
        self._consumers.extend(consumers)

    async def stop_consuming(self) -> None:
        """Cancel the consumers: the broker sends no more deliveries (a few may still be in flight).

        While the connection is down there is nothing to cancel (the broker dropped the consumers with it), so
        a shutdown does not wait for an absent broker; otherwise all are cancelled at once, 5 s at most.
        """
        consumers, self._consumers = self._consumers, []
        if not consumers or not self.is_connected:
            return
        results = await asyncio.gather(
            *(asyncio.wait_for(queue.cancel(tag), 5) for queue, tag in consumers), return_exceptions=True
        )
        for (_, tag), result in zip(consumers, results, strict=True):
            if isinstance(result, Exception):  # a dead connection cancels them anyway
                log.debug("cancelling consumer %s failed: %s", tag, scrub(str(result), self._url))

    @staticmethod
    def is_held(token: Any) -> bool:
        """Whether the delivery ``token`` is still ours to ack (its channel is open)."""
        try:
            return not token.channel.is_closed
        except aiormq.exceptions.ChannelInvalidStateError:
            return False

    async def ack(self, token: _Token) -> None:
        """Acknowledge the delivery ``token`` (coalesced with others into one ``multiple`` ack when exact).

        Only ever on the channel that delivered it (delivery tags are per channel): if that channel is closed,
        this raises and the broker redelivers the message.
        """
        channel = token.channel  # aio-pika's message raises here if its channel is closed; aiormq's on the ack
        acks = self._acks
        if acks is not None and acks.channel is channel:
            await acks.ack(token.delivery_tag)  # type: ignore[arg-type]
        else:
            await channel.basic_ack(token.delivery_tag)  # type: ignore[arg-type]

    async def nack(self, token: _Token, *, requeue: bool = True) -> None:
        """Negatively acknowledge the delivery ``token`` (requeued by default), on the channel it came from."""
        channel = token.channel
        acks = self._acks
        if acks is not None and acks.channel is channel:
            await acks.nack(token.delivery_tag, requeue=requeue)  # type: ignore[arg-type]
        else:
            await channel.basic_nack(token.delivery_tag, requeue=requeue)  # type: ignore[arg-type]

    def _track(self, channel: aiormq.abc.AbstractChannel, tag: int) -> None:
        acks = self._acks
        if acks is None or acks.channel is not channel:
            # A new channel after a reconnect: tags restart at 1.
            acks = self._acks = AckCoalescer(channel, batch=self._ack_batch, delay=ACK_DELAY)
        acks.track(tag)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self.is_connected else "idle")
        return (
            f"<RabbitMQTransport {mask_url(self._url)} exchange={self.settings.exchange!r} "
            f"queues={len(self.queues)} {state}>"
        )


#: What the worker gets as a delivery's token: aiormq's delivery (the usual case), or aio-pika's message (the first
#: delivery after the robust channel restored a consumer). Both have ``.channel`` and ``.delivery_tag``.
_Token = typing.Union["DeliveredMessage", "AbstractIncomingMessage"]


class _Consumer:
    """The worker's consumer of one queue.

    It is registered through aio-pika (``Queue.consume``), so the robust channel restores it, re-declaring the
    exchange, the queue and its binding first, after a reconnect or a broker-side cancel (a deleted queue).
    aio-pika delivers through its own wrapper: an ``IncomingMessage`` and a task per delivery, on top of the task
    aiormq makes. :meth:`install` puts :meth:`on_delivered` in that wrapper's place in the aiormq channel's
    consumer table, so a delivery goes from pamqp's decoded frame straight to :class:`~queueable.IncomingMessage`.
    After any restore aio-pika's wrapper is back; it still works, and its first delivery installs
    :meth:`on_delivered` again.
    """

    __slots__ = ("deliver", "queue", "tag", "track")

    def __init__(
        self,
        queue: str,
        tag: str,
        deliver: Callable[..., None],
        track: Callable[[aiormq.abc.AbstractChannel, int], None],
    ) -> None:
        self.queue = queue
        self.tag = tag
        self.deliver = deliver
        self.track = track

    def install(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Deliver through :meth:`on_delivered` on ``channel``, if this consumer is registered there."""
        consumers = typing.cast("aiormq.Channel", channel).consumers
        if self.tag in consumers:
            consumers[self.tag] = callback = self.on_delivered
            _Shortcut.on(channel).add(self.tag, callback, self.delivered)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """aio-pika's callback: only until :meth:`install` has run on the current channel."""
        channel = message.channel
        self.track(channel, message.delivery_tag)  # type: ignore[arg-type]
        self.deliver(to_incoming(message, self.queue), message)
        self.install(channel)

    async def on_delivered(self, message: DeliveredMessage) -> None:
        """aiormq's callback (in a task of its own): a delivery that :class:`_Shortcut` left to aiormq."""
        self.delivered(message)

    def delivered(self, message: DeliveredMessage) -> None:
        """One delivery, its token is the delivery itself: tracked for the ack, into the worker's buffer."""
        self.track(message.channel, message.delivery.delivery_tag)  # type: ignore[union-attr,arg-type]
        self.deliver(delivered_to_incoming(message, self.queue), message)


#: Channel closes started by :class:`_Shortcut` (a reference until done, so the task is not collected).
_CLOSING: set[asyncio.Task[None]] = set()


def _closed(task: asyncio.Task[None]) -> None:
    _CLOSING.discard(task)
    if not task.cancelled() and task.exception() is not None:  # no close-ok in time: the connection goes anyway
        log.debug("closing the channel failed: %s", task.exception())


class _Shortcut:
    """Deliveries and publisher confirms taken from the connection's reader, on one aiormq channel.

    aiormq puts every frame of a channel into an ``asyncio.Queue`` (``channel.frames``) that the channel's own
    reader task drains. That task assembles a delivery from its frames (``Basic.Deliver``, the content header,
    the body) and starts a task per delivery to call the consumer; it resolves a publish's confirmation from a
    ``Basic.Ack`` (one loop iteration later for a ``multiple`` ack, which RabbitMQ sends for a batch). For the
    worker, whose consumer only hands the delivery to its buffer, that is three queue hand-offs and two task
    steps per message: a third of the worker's CPU (``make bench``, client CPU per message: 109 -> 72 µs).

    This object takes the queue's ``put``, the connection reader's only way into the channel. Every frame that
    it does not take goes into the queue as before, in its order. It takes:

    * A ``Basic.Deliver`` for a consumer that :meth:`add` registered and that aiormq still calls: assembled here
      with its content frames (which follow it on the channel, never interleaved with other frames of the
      channel) and handed to that consumer at once, in the reader's task. It may overtake frames still waiting
      in the queue: deliveries that came through aio-pika's wrapper just before a consumer's start or restore
      installed it (the worker runs deliveries concurrently anyway, and acks are tracked per tag, in any order),
      or a control frame that cannot concern it (a consumer is registered before its ``basic.consume`` is sent;
      after a cancel or a close the broker sends the consumer nothing more). It never lands inside a delivery
      that aiormq is assembling, since that delivery's content frames reached the queue before the next
      ``Basic.Deliver`` arrived. A consumer that aiormq no longer calls (cancelled, or replaced by a restore)
      gets nothing from here: its deliveries take aiormq's path.
    * A ``Basic.Ack`` or ``Basic.Nack`` on a channel in confirm mode, only while no frame waits in the queue:
      resolved here with aiormq's own ``_confirm_delivery``. The order matters there: the broker sends a
      ``basic.return`` (unroutable) before the ack of the same publish, and a nack and a later ack can cover
      the same range of earlier tags. So the confirms that do go through the queue are resolved at once as well
      (aiormq's reader calls :meth:`_on_confirm_frame` here instead of its own, which would resolve a multiple
      one a loop iteration later, where a confirm taken here could overtake it). Then an empty queue means that
      aiormq's reader has fully handled every earlier frame: a return in the step that takes its last frame, a
      confirm in the step that takes it.

    A frame out of the protocol's order (a delivery without its content frames) closes the channel, as aiormq's
    reader does; the connection and its other channels stay up.
    """

    __slots__ = (
        "_body",
        "_channel",
        "_confirming",
        "_consumers",
        "_deliver",
        "_handlers",
        "_header",
        "_put",
        "_queue",
        "_size",
        "confirmed",
        "taken",
    )

    _ATTRIBUTE = "_queueable_shortcut"

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = channel
        self._consumers: dict[str, Any] = typing.cast("aiormq.Channel", channel).consumers
        self._queue: asyncio.Queue[tuple[int, Any]] = typing.cast("aiormq.Channel", channel).frames
        self._put = self._queue.put  # aiormq's own path
        self._handlers: dict[str, tuple[Any, Callable[[DeliveredMessage], None]]] = {}
        self._deliver: Basic.Deliver | None = None  # the delivery being assembled
        self._header: ContentHeader | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._confirming = bool(getattr(channel, "publisher_confirms", False))
        self.taken = 0  # deliveries handed over from here (for tests and debugging)
        self.confirmed = 0  # confirm frames taken from here (not through aiormq's reader)
        self._queue.put = self.put  # type: ignore[method-assign]
        if self._confirming:
            # aiormq's own reader resolves a multiple confirm one loop iteration later (call_soon per tag); a
            # later confirm resolved here could overtake those and take their tags with it (a nack read as an
            # ack). Resolved synchronously on both paths, confirms keep the order they came in.
            channel._on_confirm_frame = self._on_confirm_frame  # type: ignore[attr-defined]  # noqa: SLF001

    @classmethod
    def on(cls, channel: aiormq.abc.AbstractChannel) -> _Shortcut:
        """The shortcut of ``channel``, installed on first use."""
        shortcut: _Shortcut | None = vars(channel).get(cls._ATTRIBUTE)
        if shortcut is None:
            shortcut = cls(channel)
            setattr(channel, cls._ATTRIBUTE, shortcut)
        return shortcut

    def add(self, tag: str, callback: Any, handler: Callable[[DeliveredMessage], None]) -> None:
        """Hand deliveries for ``tag`` to ``handler`` while aiormq's consumer for ``tag`` is ``callback``."""
        self._handlers[tag] = (callback, handler)

    async def put(self, item: tuple[int, Any]) -> None:
        """``channel.frames.put``: a frame from the connection's reader."""
        frame = item[1]
        if self._deliver is not None:
            self._content(frame)
            return
        kind = type(frame)
        if (kind is Basic.Ack or kind is Basic.Nack) and self._confirming and not self._queue.qsize():
            self.confirmed += 1
            self._confirm(frame)
            return
        if kind is Basic.Deliver:
            entry = self._handlers.get(frame.consumer_tag)
            if entry is not None and self._consumers.get(frame.consumer_tag) is entry[0]:
                self._deliver = frame
                return
        await self._put(item)

    def _content(self, frame: object) -> None:
        """A content frame of the delivery being assembled; the last one hands it over."""
        header = self._header
        if header is None:
            if not isinstance(frame, ContentHeader):
                self._out_of_order(frame, "a content header")
                return
            self._header = header = frame
            if header.body_size:
                return
        elif not isinstance(frame, ContentBody):
            self._out_of_order(frame, "a content body")
            return
        else:
            self._body.append(frame.value)
            self._size += len(frame.value)
            if self._size < header.body_size:
                return
        self._hand_over(header)

    async def _on_confirm_frame(self, frame: Basic.Ack | Basic.Nack) -> None:
        """aiormq's ``Channel._on_confirm_frame`` for confirms that its reader takes: resolved at once."""
        self._confirm(frame)

    def _confirm(self, frame: Basic.Ack | Basic.Nack) -> None:
        """What aiormq's ``Channel._on_confirm_frame`` does, with a ``multiple`` one resolved now, not later."""
        channel = typing.cast("aiormq.Channel", self._channel)
        confirmations = channel.confirmations
        tag = frame.delivery_tag
        if tag not in confirmations:
            log.error("Unexpected confirmation frame %r from broker", frame)
            return
        if frame.multiple:
            for each in [t for t in confirmations if t <= tag]:
                channel._confirm_delivery(each, frame)  # noqa: SLF001 - aiormq is pinned (pyproject.toml)
        else:
            channel._confirm_delivery(tag, frame)  # noqa: SLF001

    def _out_of_order(self, frame: object, expected: str) -> None:
        """A broker that breaks the protocol: close this channel, as aiormq's reader does with such a frame.

        The connection and its other channels stay up (raising here would stop the connection's reader); the
        delivery being assembled is dropped with the channel, and the broker redelivers it.
        """
        deliver = self._deliver
        self._deliver = self._header = None
        self._body, self._size = [], 0
        error = aiormq.exceptions.InvalidFrameError(f"unexpected frame {frame!r} instead of {expected}")
        log.error(
            "closing channel %s: delivery %s: %s", self._channel, getattr(deliver, "delivery_tag", "?"), error
        )
        channel = typing.cast("aiormq.Channel", self._channel)
        task = asyncio.get_running_loop().create_task(channel.close(error, timeout=channel.CHANNEL_CLOSE_TIMEOUT))
        _CLOSING.add(task)
        task.add_done_callback(_closed)

    def _hand_over(self, header: ContentHeader) -> None:
        deliver, body = self._deliver, self._body
        self._deliver = self._header = None
        self._body, self._size = [], 0
        assert deliver is not None
        message = DeliveredMessage(
            delivery=deliver,
            header=header,
            body=(body[0] if len(body) == 1 else b"".join(body)) if body else b"",
            channel=self._channel,
        )
        self.taken += 1
        try:
            self._handlers[deliver.consumer_tag][1](message)  # type: ignore[index]
        except Exception:  # as aiormq does with a consumer task that fails: log it, keep the channel
            log.exception("handing over delivery %s failed", deliver.delivery_tag)


_PENDING, _SENDING, _ACKED, _SETTLED = range(4)
#: The longest an ack waits to be written with others (see AckCoalescer).
ACK_DELAY = 0.005
_MAX_TRACKED = 65_536


class AckCoalescer:
    """The acks of one channel's deliveries, merged into ``basic.ack(multiple=True)`` only where exact.

    Delivery tags on a channel are consecutive from 1, and ``multiple=True`` at tag T acks *every* outstanding
    delivery up to T. So a multiple ack is sent only up to the highest T such that every tag from the last
    flushed one to T is known here and settled: acked, or nacked with the nack already written.

    Acks are written in batches: at once when ``batch`` of them are waiting, else ``delay`` seconds after the
    first one waiting. An ack behind a delivery that is still being processed is then sent on its own, never
    held for longer (held acks would fill the prefetch window). A frame costs a system call here and, on a
    quorum queue, a Raft command on the broker; while a queue drains, one frame covers ``batch`` messages, even
    when the worker outpaces the broker and goes idle between its bursts of deliveries. The price is that an ack
    reaches the broker up to ``delay`` later. Acks and nacks are written without waiting for the socket to
    drain, and an ack marked is an ack sent even if its handler is cancelled right after (:meth:`drain` writes
    what is waiting before the connection closes): a dead connection swallows only acks of deliveries that the
    broker then redelivers (at least once).
    """

    __slots__ = ("_flushes", "_next", "_open", "_ready", "_timer", "batch", "channel", "delay")

    def __init__(self, channel: aiormq.abc.AbstractChannel, *, batch: int = 1, delay: float = 0.0) -> None:
        self.channel = channel
        self.batch = max(batch, 1)
        self.delay = delay
        self._next = 1  # the lowest tag not yet covered by a flush
        self._open: dict[int, int] = {}  # tag -> state, for tags >= _next
        self._ready = 0  # acks marked and not yet written
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    def track(self, tag: int) -> None:
        """A delivery with ``tag`` arrived and will be acked or nacked through this object."""
        if len(self._open) >= _MAX_TRACKED:  # a tag that never arrived: stop merging, ack one by one
            self._open = {t: state for t, state in self._open.items() if state == _ACKED}  # still to be written
            self._next = 1 << 62
        if tag >= self._next:
            self._open[tag] = _PENDING

    async def ack(self, tag: int) -> None:
        """Ack ``tag``, batched with the acks of other handlers (see the class docstring)."""
        if self._open.get(tag) != _PENDING:
            await self.channel.basic_ack(tag, wait=False)
            return
        self._open[tag] = _ACKED
        self._ready += 1
        if self._ready >= self.batch:
            await self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._on_timer)

    async def nack(self, tag: int, *, requeue: bool = True) -> None:
        """Nack ``tag`` at once; its frame is queued before any later multiple ack can cover it."""
        await self.channel.basic_nack(tag, requeue=requeue, wait=False)
        if self._open.get(tag) == _PENDING:
            self._open[tag] = _SETTLED

    async def drain(self) -> None:
        """Write every ack still waiting (before the connection is closed)."""
        if self._ready:
            await self._flush()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    def _on_timer(self) -> None:
        self._timer = None
        if self._ready:
            task = asyncio.get_running_loop().create_task(self._flush_quietly())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except Exception as exc:  # the channel is gone: the broker redelivers what was not acked
            log.debug("writing acks failed: %s", exc)

    async def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._ready = 0
        tracked = self._open
        tag, last, covered = self._next, 0, 0
        while True:
            state = tracked.get(tag)
            if state is None or state < _ACKED:  # unknown (not arrived) or still owned by a handler
                break
            del tracked[tag]
            if state == _ACKED:
                last, covered = tag, covered + 1
            tag += 1
        self._next = tag
        stragglers = [t for t, state in tracked.items() if state == _ACKED]
        for straggler in stragglers:
            tracked[straggler] = _SENDING
        if last:
            await self.channel.basic_ack(last, multiple=covered > 1, wait=False)
        for straggler in stragglers:
            await self.channel.basic_ack(straggler, wait=False)
            if straggler in tracked:
                tracked[straggler] = _SETTLED


#: Marshalled Basic.Publish method frames by (channel number, exchange, routing key): the same few repeat.
_PUBLISH_FRAMES: dict[tuple[int, str, str], bytes] = {}
_PUBLISH_FRAMES_MAX = 1024


def _publish_frame(number: int, exchange: str, routing_key: str) -> bytes:
    key = (number, exchange, routing_key)
    frame = _PUBLISH_FRAMES.get(key)
    if frame is None:
        frame = pamqp.frame.marshal(
            Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True), number
        )
        if len(_PUBLISH_FRAMES) >= _PUBLISH_FRAMES_MAX:
            _PUBLISH_FRAMES.clear()
        _PUBLISH_FRAMES[key] = frame
    return frame


class _Confirm:
    """One publish's entry in aiormq's ``channel.confirmations``, standing in for a future of its own.

    aiormq resolves an entry with ``set_result`` (ack), ``set_exception`` (nack: ``DeliveryError``; a
    ``basic.return``: ``PublishError``) after checking ``done()``/``cancelled()``; nothing awaits it. This one
    records the outcome and counts its :class:`_Batch` down, without an ``asyncio.Future`` per message and the
    three callbacks that resolving one schedules.
    """

    __slots__ = ("_batch", "done_", "outcome")

    def __init__(self, batch: _Batch) -> None:
        self._batch = batch
        self.done_ = False
        self.outcome: BaseException | None = None

    @property
    def batch(self) -> _Batch:
        return self._batch

    def done(self) -> bool:
        return self.done_

    def cancelled(self) -> bool:
        return False

    def set_result(self, _: object) -> None:
        self._finish(None)

    def set_exception(self, exception: BaseException | type[BaseException]) -> None:
        self._finish(exception if isinstance(exception, BaseException) else exception())

    def _finish(self, outcome: BaseException | None) -> None:
        if self.done_:
            raise asyncio.InvalidStateError
        self.done_ = True
        self.outcome = outcome
        self._batch.one_done()


class _Batch:
    """The confirmations of one publish batch: one future (aiormq's, so a closing channel rejects it) that is
    done when every message of the batch has its outcome. The :class:`_Confirm` objects point to it, not it to
    them: a batch is no reference cycle, and goes away with its last confirm rather than at a full collection.
    """

    __slots__ = ("future", "left")

    def __init__(self, channel: aiormq.Channel, size: int) -> None:
        self.future: asyncio.Future[None] = channel.create_future()
        self.left = size

    def confirms(self) -> list[_Confirm]:
        """One confirmation per message of the batch, in order."""
        return [_Confirm(self) for _ in range(self.left)]

    def one_done(self) -> None:
        self.left -= 1
        if not self.left and not self.future.done():
            self.future.set_result(None)

    async def wait(self) -> BaseException | None:
        """Until every message has its outcome; then ``None``. If the channel or connection went away first,
        what the messages still unconfirmed failed with. Cancellation of the caller propagates.
        """
        try:
            await self.future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # aiormq cancels pending confirms when the connection drops: a connection failure, not ours.
            return ConnectionError("connection lost before the broker confirmed the message")
        except _PUBLISH_FAILURES as exc:
            return exc
        except Exception as exc:  # aiormq rejects the future with its close reason, whatever that is
            # Only a closing channel or connection fails this future (aiormq's reject_all), with the reason it
            # closed for: a reader that died of a ValueError, or a bare Exception when there was none. The
            # messages are unconfirmed either way: the caller publishes them again on a fresh channel.
            return ConnectionError(f"the channel closed before the broker confirmed the message ({exc!r})")
        return None


async def _publish_batch(
    channel: aiormq.Channel, exchange: str, routing_key: str | None, messages: Sequence[OutgoingMessage]
) -> list[BaseException | None]:
    """Publish ``messages`` (mandatory, on a channel in confirm mode) in one write and wait for every confirm.

    What ``aiormq.Channel.basic_publish(..., mandatory=True, wait=False)`` does for one message, for a batch:
    the frames of every message are marshalled before taking the channel lock, then, under the lock, each gets
    its delivery tag and confirmation (registered by message id, so that a ``basic.return`` fails it with
    ``aiormq.exceptions.PublishError``), and all the frames go to the connection's writer as one payload. No
    task per message, one lock acquisition, one socket write, and one future for the whole batch. A batch with
    a message id that an unconfirmed publish on the channel already has waits for that one first (a return is
    matched by message id); two messages of one batch must not share an id.

    Returns one entry per message: ``None`` when confirmed, else the failure, never raised, so that the caller
    can tell permanent refusals from connection losses. A message whose properties cannot be encoded fails
    alone, with ``TypeError``. Cancellation of the caller still propagates.
    """
    results: list[BaseException | None] = [None] * len(messages)
    prepared = _marshal_batch(channel, exchange, routing_key, messages, results)
    if not prepared:
        return results
    try:
        first, batch, confirms = await _send_batch(channel, prepared)
    except _PUBLISH_FAILURES as exc:  # the channel closed (before or while taking the lock)
        for index, _, _ in prepared:
            results[index] = exc
        return results
    try:
        lost = await batch.wait()
    finally:
        # As aiormq's basic_publish does once a confirmation is done: the message id no longer maps to its tag
        # (a basic.return, which comes before the ack, has been matched by then). Once per batch here.
        tags = channel.message_id_delivery_tag
        for tag, (_, message_id, _) in enumerate(prepared, first + 1):
            if tags.get(message_id) == tag:
                del tags[message_id]
    for (index, _, _), confirm in zip(prepared, confirms, strict=True):
        results[index] = confirm.outcome if confirm.done_ else lost
    return results


def _marshal_batch(
    channel: aiormq.Channel,
    exchange: str,
    routing_key: str | None,
    messages: Sequence[OutgoingMessage],
    results: list[BaseException | None],
) -> list[tuple[int, str, bytes]]:
    """(index, message id, frames) of each message that encodes; the others get their ``TypeError`` in
    ``results``.
    """
    number = channel.number
    max_size = channel.max_content_size
    prepared: list[tuple[int, str, bytes]] = []
    for index, message in enumerate(messages):
        key = routing_key or message.queue
        aiormq.channel._check_routing_key(key)  # noqa: SLF001 - the ValueError basic_publish raises
        # As basic_publish: a message needs an id, since a basic.return is matched to its publish by it.
        message_id = message.message_id or new_message_id()
        body = message.body
        try:
            header = _header_frame(message, message_id, number, len(body))
        except TypeError as exc:
            results[index] = exc
            continue
        if len(header) - _FRAME_OVERHEAD > max_size:
            # The broker would close the whole connection (FRAME_ERROR), failing every publish and delivery on
            # it; refused here, this message fails alone.
            results[index] = _FrameTooLargeError(
                f"its properties and headers take {len(header) - _FRAME_OVERHEAD:,} bytes, more than one frame "
                f"of this connection holds ({max_size:,}; the broker's frame_max)"
            )
            continue
        parts = [_publish_frame(number, exchange, key), header]
        for at in range(0, len(body), max_size):
            chunk = body[at : at + max_size]
            parts += (_FRAME_HEAD.pack(3, number, len(chunk)), chunk, _FRAME_END)
        prepared.append((index, message_id, b"".join(parts)))
    return prepared


async def _send_batch(
    channel: aiormq.Channel, prepared: list[tuple[int, str, bytes]]
) -> tuple[int, _Batch, list[_Confirm]]:
    """Register a confirmation per message and hand all the frames to the writer, under the channel lock.

    Returns the delivery tag before the batch's (its messages have the next ones, in order), the batch, and
    each message's confirmation.
    """
    while True:
        async with channel.lock:
            earlier = _unconfirmed_with_same_id(channel, prepared)
            if earlier is None:
                first = channel.delivery_tag
                batch = _Batch(channel, len(prepared))
                confirms = batch.confirms()
                for (_, message_id, _), confirm in zip(prepared, confirms, strict=True):
                    channel.delivery_tag += 1
                    channel.confirmations[channel.delivery_tag] = confirm  # type: ignore[assignment]
                    channel.message_id_delivery_tag[message_id] = channel.delivery_tag
                try:
                    payload = b"".join(frames for _, _, frames in prepared)
                    await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
                except BaseException:
                    # The broker has not seen these publishes: give their sequence numbers back (lock still held).
                    for tag, (_, message_id, _) in enumerate(prepared, first + 1):
                        channel.confirmations.pop(tag, None)
                        if channel.message_id_delivery_tag.get(message_id) == tag:
                            del channel.message_id_delivery_tag[message_id]
                    channel.delivery_tag = first
                    batch.future.cancel()
                    raise
                return first, batch, confirms
        # aiormq matches a basic.return to its publish by message id: with two unconfirmed publishes of one id on
        # this channel (a copy keeps its original's id, and at-least-once delivers duplicates), the return of
        # one would fail the other, and the returned one would pass as confirmed. Wait for the earlier one.
        await asyncio.wait({earlier})


def _unconfirmed_with_same_id(
    channel: aiormq.Channel, prepared: list[tuple[int, str, bytes]]
) -> asyncio.Future[None] | None:
    """The batch future of an unconfirmed publish on ``channel`` that has a message id of ``prepared``."""
    tags = channel.message_id_delivery_tag
    for _, message_id, _ in prepared:
        tag = tags.get(message_id)
        if tag is None:
            continue
        confirm = channel.confirmations.get(tag)
        if isinstance(confirm, _Confirm) and not confirm.done_:
            return confirm.batch.future
    return None
