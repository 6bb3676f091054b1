"""Dead-letter administration: browse, show, replay, purge, export and import, and queue status.

The ``queueable dead ...`` and ``queueable status`` commands are a thin layer over :class:`DeadLetterAdmin`.

How a dead-letter queue is read without changing it (verified on RabbitMQ 3.10.8, see ``docs/operations.md``):
every operation takes a *snapshot*: it ``basic.get``\\ s every ready message (manual ack) until the queue is
empty, keeps only the messages it works on (the others by delivery tag), decides, acks exactly the messages it
removes, and returns all the others with ``basic.nack(multiple=True, requeue=True)``, 32 tags at a time, each
chunk once the queue shows the previous one (a larger return comes back shuffled on a quorum queue). Classic
queues put requeued messages back at their old positions; quorum queues append them to the back, so returning
*all* of them, in order, into a queue that is empty restores the original order. Reading only a prefix would
rotate a quorum queue, which is why even ``--limit`` reads the whole queue. A quorum queue counts each such
return as a delivery (``x-delivery-count``): a dead-letter queue must therefore have no ``x-delivery-limit``, or
browsing it often enough would drop its messages.

Replay publishes the replay copy (:func:`queueable._consumer.replay_message`) to the exchange with the original
work queue as routing key, mandatory and confirmed, and only *then* acks the dead letter: a replay killed at
any moment leaves each message in the dead-letter queue, in its work queue, or (the one in flight) in both.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import decimal
import enum
import fnmatch
import json
import os
import re
import socket
import struct
import time
import typing
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from queueable import _wire
from queueable._consumer import (
    DEAD_SUFFIX,
    DeadReason,
    _BadInput,
    dead_letter_queue_for,
    original_queue_of,
    replay_message,
)
from queueable._settings import mask_url
from queueable.errors import ConfigurationError, PublishError, QueueableError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
    from typing import TextIO

    import aio_pika.abc
    import aiormq.abc

    from queueable._app import App
    from queueable._settings import Settings

__all__ = [
    "DeadFilter",
    "DeadLetterAdmin",
    "DeadLetterNotFoundError",
    "DeadLettersBusyError",
    "DeadMessage",
    "DryRunResult",
    "ExportFormatError",
    "QueueNotFoundError",
    "QueueStatus",
    "decode_export_line",
    "encode_export_line",
    "format_table",
    "group_counts",
    "parse_since",
]

EXPORT_VERSION = 1
#: Delivery tags per ``basic.nack(multiple)`` when a snapshot goes back (DeadLetterAdmin._return_unsettled).
RETURN_CHUNK = 32
#: The longest a returned chunk may take to show in the queue's ready count (at most ``publish_timeout``).
RETURN_WAIT_S = 5.0
#: ``<dead-letter queue><LOCK_SUFFIX>``: the exclusive queue that makes dead commands on one queue take turns.
LOCK_SUFFIX = ".lock"
# Added by the broker on each delivery from a quorum queue: not part of the message, so never shown or exported.
BROKER_DELIVERY_HEADERS = frozenset({"x-delivery-count"})
PROPERTY_NAMES = (
    "message_id",
    "correlation_id",
    "content_type",
    "content_encoding",
    "timestamp",
    "type",
    "delivery_mode",
    "priority",
    "expiration",
    "reply_to",
    "app_id",
    "user_id",
)
GROUP_KEYS = ("error", "listener", "event", "reason", "queue")


class DeadLetterNotFoundError(QueueableError, LookupError):
    """No dead letter has the requested id."""


class QueueNotFoundError(QueueableError, LookupError):
    """A queue or exchange that the command needs does not exist on the broker."""


class DeadLettersBusyError(QueueableError):
    """Another ``queueable dead`` command holds the dead-letter queue (one at a time, or they see each other's
    held letters as missing)."""


class ExportFormatError(QueueableError, ValueError):
    """A line of an export file cannot be read back."""


# -- one dead letter -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadMessage:
    """One dead letter as it sits in its dead-letter queue: body, headers and AMQP properties, verbatim.

    ``position`` is its 0-based place in ``queue`` when it was read. The derived attributes (``reason``,
    ``error_type``, ``dead_at``...) read the ``x-queueable-*`` headers the consumer wrote; a message the *broker*
    dead-lettered (a quorum queue's delivery limit: the worker kept dying on it) has only an ``x-death`` header
    and reports reason ``delivery_limit``.
    """

    queue: str
    position: int
    body: bytes
    headers: Mapping[str, Any]
    properties: Mapping[str, Any] = field(default_factory=dict)

    # -- properties ----------------------------------------------------------------------------------

    @property
    def message_id(self) -> str | None:
        """The original message id (the same across retries, dead-lettering and replay)."""
        return _str_or_none(self.properties.get("message_id"))

    @property
    def correlation_id(self) -> str | None:
        """The correlation id of the dispatch that produced the message."""
        return _str_or_none(self.properties.get("correlation_id"))

    @property
    def timestamp(self) -> int | None:
        """The AMQP timestamp (POSIX seconds) the producer set."""
        value = self.properties.get("timestamp")
        return value if isinstance(value, int) else None

    # -- what the consumer recorded ------------------------------------------------------------------

    def header(self, name: str) -> Any:
        """A header's value, or ``None``."""
        return self.headers.get(name)

    @property
    def x_death(self) -> Mapping[str, Any] | None:
        """The broker's most recent ``x-death`` entry, when the broker dead-lettered this message."""
        deaths = self.headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            return deaths[0]
        return None

    @property
    def reason(self) -> str:
        """Why it is dead: a :class:`~queueable.DeadReason` value, or ``unknown`` for a foreign message."""
        value = _text(self.header(_wire.H_DEAD_REASON))
        if value:
            return value
        if self.x_death is not None:
            return str(DeadReason.DELIVERY_LIMIT)
        return "unknown"

    @property
    def listener(self) -> str | None:
        """The listener id the message was for."""
        return _text(self.header(_wire.H_LISTENER))

    @property
    def event(self) -> str | None:
        """The event's wire name."""
        return _text(self.header(_wire.H_EVENT))

    @property
    def error_type(self) -> str | None:
        """The qualified name of the exception (``BadMessage`` for undecodable input)."""
        return _text(self.header(_wire.H_ERROR_TYPE))

    @property
    def error_message(self) -> str | None:
        """The error, one line (for broker dead-lettering, what happened)."""
        text = _text(self.header(_wire.H_ERROR_MESSAGE))
        if text is None and self.x_death is not None:
            death = self.x_death
            text = (
                f"the broker dead-lettered it from {_text(death.get('queue')) or '?'} "
                f"({_text(death.get('reason')) or 'delivery_limit'}): a worker kept dying or timing out on it"
            )
        return text

    @property
    def traceback(self) -> str | None:
        """The formatted traceback, if the listener raised."""
        return _text(self.header(_wire.H_ERROR_TRACEBACK))

    @property
    def attempt(self) -> int:
        """How many times the listener ran (1 for bad input that never reached it)."""
        return _as_int(self.header(_wire.H_ATTEMPT), 1)

    @property
    def replays(self) -> int:
        """How many times it has been replayed before."""
        return _as_int(self.header(_wire.H_REPLAYS), 0)

    @property
    def dead_at(self) -> datetime | None:
        """When it was dead-lettered."""
        parsed = _parse_time(self.header(_wire.H_DEAD_AT))
        if parsed is None and self.x_death is not None:
            parsed = _parse_time(self.x_death.get("time"))
        return parsed

    @property
    def first_failure_at(self) -> datetime | None:
        """When the listener first failed on it."""
        return _parse_time(self.header(_wire.H_FIRST_FAILURE))

    @property
    def last_failure_at(self) -> datetime | None:
        """When the listener last failed on it."""
        return _parse_time(self.header(_wire.H_LAST_FAILURE))

    @property
    def original_queue(self) -> str:
        """The work queue it came from (where a replay sends it)."""
        return original_queue_of(self.to_incoming())

    def to_incoming(self) -> _wire.IncomingMessage:
        """The message as the consumer's decision function sees it."""
        return _wire.IncomingMessage(
            queue=self.queue,
            body=self.body,
            headers=dict(self.headers),
            message_id=self.message_id,
            correlation_id=self.correlation_id,
            timestamp=float(self.timestamp) if self.timestamp is not None else None,
            content_type=_str_or_none(self.properties.get("content_type")),
            content_encoding=_str_or_none(self.properties.get("content_encoding")),
            type=_str_or_none(self.properties.get("type")),
        )

    def summary(self) -> dict[str, Any]:
        """What ``dead list --json`` prints: one flat JSON-safe object."""
        return {
            "id": self.message_id,
            "queue": self.queue,
            "original_queue": self.original_queue,
            "position": self.position,
            "reason": self.reason,
            "listener": self.listener,
            "event": self.event,
            "error_type": self.error_type,
            "error": self.error_message,
            "attempt": self.attempt,
            "replays": self.replays,
            "dead_at": _iso(self.dead_at),
            "first_failure_at": _iso(self.first_failure_at),
            "correlation_id": self.correlation_id,
            "size": len(self.body),
        }

    def details(self) -> dict[str, Any]:
        """What ``dead show --json`` prints: the summary plus traceback, headers, properties and the body."""
        data = self.summary()
        data["last_failure_at"] = _iso(self.last_failure_at)
        data["consumer_host"] = _text(self.header(_wire.H_CONSUMER_HOST))
        data["consumer_pid"] = self.header(_wire.H_CONSUMER_PID)
        data["traceback"] = self.traceback
        data["properties"] = {k: _json_safe(v) for k, v in self.properties.items()}
        data["headers"] = {k: _json_safe(v) for k, v in self.headers.items()}
        try:
            data["body"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            data["body_base64"] = base64.b64encode(self.body).decode("ascii")
        return data


def _delivery_to_dead(queue: str, position: int, raw: aio_pika.abc.AbstractIncomingMessage) -> DeadMessage:
    headers = {k: v for k, v in (raw.headers or {}).items() if k not in BROKER_DELIVERY_HEADERS}
    properties: dict[str, Any] = {}
    for name in PROPERTY_NAMES:
        value = getattr(raw, name, None)
        if value is None:
            continue
        if name == "timestamp" and isinstance(value, datetime):
            value = int(value.timestamp())
        elif name == "delivery_mode":
            value = int(value)
        elif name == "expiration" and isinstance(value, float | int):
            value = round(value * 1000)  # aio-pika decodes the milliseconds string to seconds; keep ms
        properties[name] = value
    body = bytes(raw.body)
    return DeadMessage(queue=queue, position=position, body=body, headers=headers, properties=properties)


# -- filters -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadFilter:
    """Which dead letters an operation applies to; every given criterion must hold.

    ``listener``, ``event``, ``error`` and ``reason`` are shell-style patterns (``mailer:*``); ``error`` also
    matches the exception's unqualified name (``TimeoutError`` matches ``asyncio.TimeoutError``). ``since``
    keeps letters dead-lettered at or after that moment; ``ids`` keeps only those message ids.
    """

    ids: frozenset[str] = frozenset()
    listener: str | None = None
    event: str | None = None
    error: str | None = None
    reason: str | None = None
    since: datetime | None = None

    def matches(self, message: DeadMessage) -> bool:  # noqa: PLR0911 - one early return per criterion
        """Whether ``message`` is selected."""
        if self.ids and message.message_id not in self.ids:
            return False
        if self.listener is not None and not _match(message.listener, self.listener):
            return False
        if self.event is not None and not _match(message.event, self.event):
            return False
        if self.reason is not None and not _match(message.reason, self.reason):
            return False
        if self.error is not None:
            error_type = message.error_type
            short = error_type.rsplit(".", 1)[-1] if error_type else None
            if not (_match(error_type, self.error) or _match(short, self.error)):
                return False
        if self.since is not None:
            dead_at = message.dead_at
            if dead_at is None or dead_at < self.since:
                return False
        return True

    @property
    def is_empty(self) -> bool:
        """Whether it selects everything."""
        return not self.ids and all(
            value is None for value in (self.listener, self.event, self.error, self.reason, self.since)
        )


def _match(value: str | None, pattern: str) -> bool:
    return value is not None and fnmatch.fnmatchcase(value, pattern)


_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``30s``, ``15m``, ``1h``, ``2d``, ``1w`` ago, or an ISO 8601 moment (UTC unless it says otherwise)."""
    now = now or datetime.now(UTC)
    matched = _SINCE.match(text)
    if matched:
        seconds = float(matched.group(1)) * _UNITS[matched.group(2).lower()]
        return now - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        msg = f"cannot read {text!r} as a duration (30s, 15m, 1h, 2d, 1w) or an ISO 8601 time"
        raise ValueError(msg) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def group_counts(messages: Iterable[DeadMessage], key: str) -> list[tuple[str, int]]:
    """How many dead letters per error type, listener, event, reason or queue; largest group first."""
    if key not in GROUP_KEYS:
        msg = f"cannot group by {key!r}: use one of {', '.join(GROUP_KEYS)}"
        raise ValueError(msg)
    getters: dict[str, Callable[[DeadMessage], str | None]] = {
        "error": lambda m: m.error_type or m.reason,
        "listener": lambda m: m.listener,
        "event": lambda m: m.event,
        "reason": lambda m: m.reason,
        "queue": lambda m: m.original_queue,
    }
    counts = Counter(getters[key](m) or "-" for m in messages)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


# -- human output -------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("ID", "DEAD AT", "QUEUE", "LISTENER", "EVENT", "REASON", "ATTEMPT", "ERROR")


def table_row(message: DeadMessage) -> list[str]:
    """One dead letter as the cells of :data:`TABLE_COLUMNS`."""
    dead_at = message.dead_at
    error = message.error_message or ""
    if message.error_type:
        error = f"{message.error_type.rsplit('.', 1)[-1]}: {error}"
    return [
        message.message_id or "-",
        dead_at.strftime("%Y-%m-%d %H:%M:%S") if dead_at else "-",
        message.original_queue,
        message.listener or "-",
        message.event or "-",
        message.reason,
        str(message.attempt),
        error,
    ]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, max_width: int = 60) -> str:
    """Left-aligned columns separated by two spaces; a cell longer than ``max_width`` ends with ``…``.

    Newlines in cells become spaces, so one row is always one line.
    """
    cleaned = [[_cell(value, max_width) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cleaned:
        for index, value in enumerate(row):
            widths[index] = max(widths[index], len(value))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.extend("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cleaned)
    return "\n".join(lines)


def _cell(value: str, max_width: int) -> str:
    flat = " ".join(value.split())
    return flat if len(flat) <= max_width else flat[: max_width - 1] + "…"


# -- the export format ---------------------------------------------------------------------------------------
#
# One JSON object per line: {"v": 1, "queue": ..., "properties": {...}, "headers": {...}, "body_b64": ...}.
# Header values keep their AMQP types: str, int, float, bool and null as JSON; bytes as {"$bytes": base64};
# timestamps as {"$datetime": iso}; decimals as {"$decimal": "1.5"}; arrays as lists; tables as objects with
# sorted keys (AMQP tables are unordered and the client sends them sorted, so exporting an import gives the same
# bytes). A table whose only key starts with "$" is wrapped as {"$table": {...}}: never mistaken for a tag.


def encode_export_line(message: DeadMessage) -> str:
    """The export line of one dead letter (no trailing newline)."""
    record = {
        "v": EXPORT_VERSION,
        "queue": message.queue,
        "properties": {k: _encode_value(v) for k, v in message.properties.items()},
        "headers": {k: _encode_value(message.headers[k]) for k in sorted(message.headers)},
        "body_b64": base64.b64encode(message.body).decode("ascii"),
    }
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=True)


def decode_export_line(line: str, *, position: int = 0) -> DeadMessage:
    """Read back one line written by :func:`encode_export_line`."""
    try:
        record = json.loads(line)
    except ValueError as exc:
        msg = f"not JSON: {exc}"
        raise ExportFormatError(msg) from exc
    if not isinstance(record, dict) or record.get("v") != EXPORT_VERSION:
        msg = f"not a version {EXPORT_VERSION} queueable export record"
        raise ExportFormatError(msg)
    try:
        properties = {k: _decode_value(v) for k, v in record.get("properties", {}).items()}
        headers = {k: _decode_value(v) for k, v in record.get("headers", {}).items()}
        body = base64.b64decode(record["body_b64"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        msg = f"unreadable export record: {exc!r}"
        raise ExportFormatError(msg) from exc
    unknown = set(properties) - set(PROPERTY_NAMES)
    if unknown:
        msg = f"unknown properties {sorted(unknown)}"
        raise ExportFormatError(msg)
    queue = record.get("queue")
    if not isinstance(queue, str) or not queue:
        msg = "export record has no queue"
        raise ExportFormatError(msg)
    return DeadMessage(queue=queue, position=position, body=body, headers=headers, properties=properties)


def _encode_value(value: Any) -> Any:  # noqa: PLR0911 - one branch per AMQP type
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, list | tuple):
        return [_encode_value(v) for v in value]
    if isinstance(value, dict):
        table = {str(k): _encode_value(value[k]) for k in sorted(value)}  # AMQP tables are unordered
        if len(table) == 1 and next(iter(table)).startswith("$"):
            return {"$table": table}
        return table
    msg = f"cannot export a header value of type {type(value).__qualname__}"
    raise TypeError(msg)


def _decode_value(value: Any) -> Any:  # noqa: PLR0911 - one branch per tag
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "$bytes":
            return base64.b64decode(inner, validate=True)
        if tag == "$datetime":
            return datetime.fromisoformat(inner)
        if tag == "$decimal":
            return decimal.Decimal(inner)
        if tag == "$table":
            return {k: _decode_value(v) for k, v in inner.items()}
    return {k: _decode_value(v) for k, v in value.items()}


def _import_message(message: DeadMessage) -> tuple[aio_pika.Message, int]:
    """The AMQP message that puts ``message`` back as it was exported, and the size of its header frame's
    payload; ``ExportFormatError`` if it cannot be encoded.
    """
    import aio_pika  # noqa: PLC0415 - only the broker commands need it
    from pamqp.header import ContentHeader  # noqa: PLC0415

    props = dict(message.properties)
    expiration = props.pop("expiration", None)
    try:
        amqp = aio_pika.Message(
            body=message.body,
            headers=_amqp_value(dict(message.headers)),
            # aio-pika takes seconds and writes int(seconds * 1000): half a millisecond more keeps 1001 ms 1001.
            expiration=(expiration + 0.5) / 1000 if isinstance(expiration, int) else None,
            **props,
        )
        header = ContentHeader(0, len(message.body), amqp.properties).marshal()
    except (TypeError, ValueError, OverflowError, struct.error) as exc:
        raise _unsendable(message, str(exc)) from exc
    return amqp, len(header)


def _unsendable(message: DeadMessage, why: str) -> ExportFormatError:
    return ExportFormatError(
        f"letter {message.position + 1} ({message.message_id}) cannot be sent over AMQP as exported: {why}"
    )


async def _to_the_end(step: Awaitable[None]) -> None:
    """Await ``step`` to its end even if this task is cancelled meanwhile (Ctrl-C), then let the cancellation go
    on: a return of letters cut off half-way would leave the rest to the broker's order (and a cancelled
    channel call closes the channel).
    """
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def _amqp_value(value: Any) -> Any:
    """A header value as pamqp can encode it (it sends ``bytearray``, not ``bytes``, as a byte array)."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, list):
        return [_amqp_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _amqp_value(v) for k, v in value.items()}
    return value


# -- dry run -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DryRunResult:
    """What replaying one dead letter would do with the current code: ``ok``, or the reason it would fail."""

    message: DeadMessage
    ok: bool
    reason: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe, for ``--json``."""
        return {
            "id": self.message.message_id,
            "queue": self.message.original_queue,
            "listener": self.message.listener,
            "event": self.message.event,
            "would": "run" if self.ok else "fail",
            "reason": self.reason,
            "error": self.error,
        }


def dry_run(app: App, message: DeadMessage) -> DryRunResult:
    """Decode the replay copy with the app's own decision function and resolve the listener's service.

    Uses the worker's decoder, so the verdict is exactly what a worker running this code would decide before
    it calls the listener (it cannot know whether the listener itself would fail again).
    """
    processor = app.processor()
    copy = replay_message(message.to_incoming())
    incoming = _wire.IncomingMessage(
        queue=copy.queue,
        body=copy.body,
        headers=copy.headers,
        message_id=copy.message_id,
        correlation_id=copy.correlation_id,
        timestamp=copy.timestamp,
        content_type=copy.content_type,
        type=copy.type,
    )
    try:
        entry, _event = processor._decode(incoming)  # noqa: SLF001 - the worker's own decoder, so they agree
    except _BadInput as bad:
        return DryRunResult(message, ok=False, reason=str(bad.reason), error=bad.detail)
    try:
        entry.resolve(processor.container)
    except Exception as exc:
        return DryRunResult(message, ok=False, reason="service", error=f"{type(exc).__qualname__}: {exc}")
    return DryRunResult(message, ok=True)


# -- status --------------------------------------------------------------------------------------------------


class QueueKind(enum.StrEnum):
    """The role of a queueable queue."""

    WORK = "work"
    DEAD = "dead"
    DELAY = "delay"


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One queue as a passive declare reports it. ``unacked`` needs the management API (``None`` without)."""

    name: str
    kind: QueueKind
    exists: bool
    ready: int | None = None
    consumers: int | None = None
    unacked: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe, for ``--json``."""
        return {
            "queue": self.name,
            "kind": str(self.kind),
            "exists": self.exists,
            "ready": self.ready,
            "unacked": self.unacked,
            "consumers": self.consumers,
        }


def kind_of(name: str) -> QueueKind:
    """Work, dead-letter or delay queue, from the fixed naming scheme."""
    if name.endswith(DEAD_SUFFIX):
        return QueueKind.DEAD
    if re.search(r"\.delay\.\d+$", name):
        return QueueKind.DELAY
    return QueueKind.WORK


# -- the admin API -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Held:
    raw: aio_pika.abc.AbstractIncomingMessage
    message: DeadMessage
    settled: bool = False


@dataclass(slots=True)
class _Snapshot:
    """A dead-letter queue read to the end and held unacked: the messages an operation asked to keep, in order
    (``kept``), and for all the others only their delivery tags, which is all it takes to give them back.
    Memory follows what is kept, not the length of the queue.
    """

    queue: str
    kept: list[_Held] = field(default_factory=list)
    #: Delivery tags of the messages read and not kept (8 bytes each).
    unkept: array.array[int] = field(default_factory=lambda: array.array("Q"))
    read: int = 0


class DeadLetterAdmin:
    """Typed async administration of the dead-letter queues of ``queues`` (work queue names).

    ::

        async with DeadLetterAdmin(settings, ["queueable"]) as admin:
            for message in await admin.browse(DeadFilter(error="TimeoutError")):
                print(message.message_id, message.error_message)
            moved = await admin.replay(DeadFilter(listener="mailer:*"))

    Every operation reads a whole dead-letter queue and returns what it leaves in the same order (see the
    module docstring); it holds those messages unacked meanwhile, so keep one operation per queue at a time.
    """

    def __init__(self, settings: Settings, queues: Iterable[str], *, hold_seconds: float = 600.0) -> None:
        if settings.scheme not in ("amqp", "amqps"):
            got = f"got {mask_url(settings.url)}" if settings.url else "no URL is set"
            msg = f"dead letters live in RabbitMQ: set QUEUEABLE_URL or --url to amqp://... ({got})"
            raise ConfigurationError(msg)
        self.settings = settings
        names: list[str] = []
        for queue in queues:
            work = queue.removesuffix(DEAD_SUFFIX)
            if work not in names:
                names.append(work)
        if not names:
            names.append(settings.default_queue)
        self.queues = names
        #: The longest a replay or purge holds one snapshot before returning it and taking a fresh one.
        self.hold_seconds = hold_seconds
        #: Things an operator should know about the last operations (e.g. other consumers on a dead-letter queue).
        self.warnings: list[str] = []
        self._locks: set[str] = set()
        self._connection: aio_pika.abc.AbstractConnection | None = None

    @classmethod
    def for_app(cls, app: App, queues: Iterable[str] = ()) -> DeadLetterAdmin:
        """The admin of an app's queues (or of ``queues`` when given)."""
        return cls(app.settings, list(queues) or app.provider.all_queue_names)

    @property
    def dead_queues(self) -> list[str]:
        """The dead-letter queues this admin reads."""
        return [dead_letter_queue_for(q) for q in self.queues]

    async def connect(self) -> None:
        """Open the connection (``async with`` does this)."""
        import aio_pika  # noqa: PLC0415 - only the broker commands need it

        from queueable.transport.rabbitmq import (  # noqa: PLC0415 - the same TLS setup and errors as workers
            open_refused,
            ssl_context,
        )

        if self._connection is None:
            url = self.settings.url or ""
            try:
                self._connection = await aio_pika.connect(
                    url,
                    ssl_context=ssl_context(self.settings),
                    timeout=self.settings.connect_timeout,
                    client_properties={
                        "connection_name": f"queueable admin {socket.gethostname()} pid {os.getpid()}"
                    },
                )
            except Exception as exc:
                refused = open_refused(exc, url)
                if refused is None:
                    raise
                raise ConnectionRefusedError(refused) from None

    async def close(self) -> None:
        """Close the connection; any message still held returns to its queue."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()

    async def __aenter__(self) -> DeadLetterAdmin:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def connection(self) -> aio_pika.abc.AbstractConnection:
        """The open connection."""
        if self._connection is None:
            msg = "DeadLetterAdmin is not connected: use `async with DeadLetterAdmin(...)`"
            raise QueueableError(msg)
        return self._connection

    # -- reading -------------------------------------------------------------------------------------

    async def browse(self, flt: DeadFilter | None = None, *, limit: int | None = None) -> list[DeadMessage]:
        """The matching dead letters, queue by queue in queue order; nothing changes on the broker.

        Only the matching ones (up to ``limit``) are kept in memory while the whole queue is read.
        """
        flt = flt or DeadFilter()
        found: list[DeadMessage] = []
        missing: list[QueueNotFoundError] = []
        for dead_queue in self.dead_queues:
            room = None if limit is None else limit - len(found)
            try:
                async with self._snapshot(dead_queue, flt.matches, room) as snapshot:
                    found.extend(h.message for h in snapshot.kept)
            except QueueNotFoundError as exc:
                missing.append(exc)
            if limit is not None and len(found) >= limit:
                break
        _raise_if_all_missing(missing, len(self.dead_queues))
        return found

    async def get(self, message_id: str) -> list[DeadMessage]:
        """Every dead letter with this id (usually one); raises :class:`DeadLetterNotFoundError`."""
        found = await self.browse(DeadFilter(ids=frozenset({message_id})))
        if not found:
            msg = f"no dead letter with id {message_id!r} in {', '.join(self.dead_queues)}"
            raise DeadLetterNotFoundError(msg)
        return found

    async def check(
        self, app: App, flt: DeadFilter | None = None, *, limit: int | None = None
    ) -> list[DryRunResult]:
        """``--dry-run``: what replaying the matching dead letters would do with ``app``'s code; moves nothing."""
        return [dry_run(app, message) for message in await self.browse(flt, limit=limit)]

    async def count(self) -> int:
        """Ready messages in all the dead-letter queues (a passive declare; no browsing)."""
        total = 0
        for status in await self.status(self.dead_queues):
            total += status.ready or 0
        return total

    # -- changing ------------------------------------------------------------------------------------

    async def replay(
        self,
        flt: DeadFilter | None = None,
        *,
        limit: int | None = None,
        rate: float | None = None,
        progress: Callable[[DeadMessage], None] | None = None,
        to_queue: str | None = None,
    ) -> list[DeadMessage]:
        """Move the matching dead letters back to their work queues; returns those moved, in order.

        ``to_queue`` sends every copy to that work queue instead (a listener moved to another queue).

        Each copy (attempt 1, ``x-queueable-replays`` + 1, failure headers removed) is published to the
        exchange with routing key = the original work queue, mandatory and confirmed; only then is the dead
        letter acked. The first failure stops the replay with :class:`~queueable.PublishError`, leaving that
        message and all the unprocessed ones where they were. ``rate`` limits to that many messages a second.
        """
        import aio_pika  # noqa: PLC0415

        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            try:
                exchange = await channel.get_exchange(self.settings.exchange, ensure=True)
            except Exception as exc:
                if _is_not_found(exc):
                    msg = (
                        f"exchange {self.settings.exchange!r} does not exist: start a worker once so it "
                        "declares the topology, then replay"
                    )
                    raise QueueNotFoundError(msg) from exc
                raise

            async def publish(message: DeadMessage) -> None:
                out = replay_message(message.to_incoming())
                target = to_queue or out.queue
                amqp = aio_pika.Message(
                    body=out.body,
                    headers=_amqp_value(out.headers),
                    message_id=out.message_id,
                    correlation_id=out.correlation_id,
                    content_type=out.content_type,
                    content_encoding=_str_or_none(message.properties.get("content_encoding")),
                    timestamp=int(out.timestamp),
                    type=out.type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                try:
                    await exchange.publish(
                        amqp, routing_key=target, mandatory=True, timeout=self.settings.publish_timeout
                    )
                except Exception as exc:
                    msg = (
                        f"replay of {message.message_id} to queue {target!r} was not confirmed "
                        f"({type(exc).__qualname__}: {exc}); it is still in {message.queue}"
                    )
                    raise PublishError(msg) from exc

            return await self._move(flt, limit=limit, rate=rate, progress=progress, action=publish)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def purge(
        self,
        flt: DeadFilter | None = None,
        *,
        limit: int | None = None,
        progress: Callable[[DeadMessage], None] | None = None,
    ) -> list[DeadMessage]:
        """Delete the matching dead letters; returns those deleted. The rest stay, in order."""
        return await self._move(flt, limit=limit, rate=None, progress=progress, action=None)

    async def export(
        self,
        out: TextIO,
        flt: DeadFilter | None = None,
        *,
        limit: int | None = None,
        progress: Callable[[DeadMessage], None] | None = None,
    ) -> int:
        """Write the matching dead letters as JSON lines (see :func:`encode_export_line`); moves nothing."""
        written = 0
        for message in await self.browse(flt, limit=limit):
            out.write(encode_export_line(message) + "\n")
            written += 1
            if progress is not None:
                progress(message)
        return written

    async def import_(
        self,
        messages: Iterable[DeadMessage],
        *,
        queue: str | None = None,
        progress: Callable[[DeadMessage], None] | None = None,
    ) -> int:
        """Publish exported dead letters back, each into its queue (or into ``queue``), confirmed, verbatim.

        They go through the default exchange straight to the named dead-letter queue, with the exact body,
        headers and properties they were exported with.
        """

        # Every letter is made into an AMQP message, and its header frame encoded, before any is published: a
        # value AMQP cannot carry (a float beyond float32's range, say) fails the import before it starts, not
        # half-way through, which a second run would then duplicate.
        prepared = [(message, *_import_message(message)) for message in messages]
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        imported = 0
        try:
            # The broker closes the whole connection for a header frame over its frame_max: checked first too.
            room = typing.cast("aiormq.Channel", await channel.get_underlay_channel()).max_content_size
            for message, _, header_size in prepared:
                if header_size > room:
                    why = f"its properties and headers take {header_size:,} bytes, more than one frame holds"
                    raise _unsendable(message, f"{why} ({room:,})")
            targets = [
                dead_letter_queue_for(queue.removesuffix(DEAD_SUFFIX)) if queue else message.queue
                for message, _, _ in prepared
            ]
            for target in dict.fromkeys(targets):  # every queue exists before the first letter goes
                await self._require_queue(target)
            for (message, amqp, _), target in zip(prepared, targets, strict=True):
                await channel.default_exchange.publish(
                    amqp, routing_key=target, mandatory=True, timeout=self.settings.publish_timeout
                )
                imported += 1
                if progress is not None:
                    progress(message)
        finally:
            if not channel.is_closed:
                await channel.close()
        return imported

    # -- status --------------------------------------------------------------------------------------

    async def status(self, names: Iterable[str] | None = None) -> list[QueueStatus]:
        """Ready messages and consumers of each queue, by passive declare (missing queues say so)."""
        if names is None:
            names = [n for q in self.queues for n in (q, dead_letter_queue_for(q))]
        result: list[QueueStatus] = []
        channel = await self.connection.channel()
        try:
            for name in names:
                if channel.is_closed:
                    channel = await self.connection.channel()
                try:
                    queue = await channel.declare_queue(name, passive=True)
                except Exception as exc:
                    if not _is_not_found(exc):
                        raise
                    result.append(QueueStatus(name, kind_of(name), exists=False))
                    continue
                declared = queue.declaration_result
                result.append(
                    QueueStatus(
                        name,
                        kind_of(name),
                        exists=True,
                        ready=declared.message_count,
                        consumers=declared.consumer_count,
                    )
                )
        finally:
            if not channel.is_closed:
                await channel.close()
        return result

    # -- the snapshot --------------------------------------------------------------------------------

    async def _require_queue(self, name: str) -> None:
        statuses = await self.status([name])
        if not statuses[0].exists:
            msg = f"queue {name!r} does not exist"
            raise QueueNotFoundError(msg)

    @contextlib.asynccontextmanager
    async def _locked(self, dead_queue: str) -> AsyncIterator[None]:
        """Hold the admin lock of ``dead_queue``: an exclusive queue ``<dead_queue>.lock`` on this connection.

        Only one connection can declare an exclusive queue; the broker deletes it when the connection dies,
        so a killed command never leaves the lock behind. Re-entrant within this admin.
        """
        if dead_queue in self._locks:
            yield
            return
        name = dead_queue + LOCK_SUFFIX
        channel = await self.connection.channel()
        try:
            await channel.declare_queue(name, exclusive=True, durable=False, arguments={"x-queue-type": "classic"})
        except Exception as exc:
            if not _is_locked(exc):
                raise
            msg = (
                f"another `queueable dead` command is working on {dead_queue} (it holds {name}); "
                "run this one when it has finished"
            )
            raise DeadLettersBusyError(msg) from exc
        self._locks.add(dead_queue)
        try:
            yield
        finally:
            self._locks.discard(dead_queue)
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.queue_delete(name)
                await channel.close()

    @contextlib.asynccontextmanager
    async def _snapshot(
        self, dead_queue: str, keep: Callable[[DeadMessage], bool], room: int | None = None
    ) -> AsyncIterator[_Snapshot]:
        """Every ready message of ``dead_queue``, held unacked; on exit the unsettled ones go back in order.

        The snapshot keeps the first ``room`` messages (all when ``None``) for which ``keep`` is true; the
        others are dropped as soon as they are read, and only given back.
        """
        await self._require_queue(dead_queue)
        async with self._locked(dead_queue), self._held(dead_queue, keep, room) as snapshot:
            yield snapshot

    @contextlib.asynccontextmanager
    async def _held(
        self, dead_queue: str, keep: Callable[[DeadMessage], bool], room: int | None
    ) -> AsyncIterator[_Snapshot]:
        channel = await self.connection.channel()
        snapshot = _Snapshot(dead_queue)
        kept = snapshot.kept
        try:
            try:
                queue = await channel.declare_queue(dead_queue, passive=True)
            except Exception as exc:
                if _is_not_found(exc):
                    msg = f"dead-letter queue {dead_queue!r} does not exist (no worker has declared it yet)"
                    raise QueueNotFoundError(msg) from exc
                raise
            consumers = queue.declaration_result.consumer_count or 0
            if consumers:
                self.warnings.append(
                    f"{dead_queue} has {consumers} consumer(s): they receive dead letters while this command "
                    "reads the queue, so what it sees may be incomplete"
                )
            # Until empty; bounded, so that letters arriving as fast as they are read cannot keep it going.
            bound = 2 * (queue.declaration_result.message_count or 0) + 1000
            cancelled: asyncio.CancelledError | None = None
            while snapshot.read < bound:
                getting = asyncio.ensure_future(
                    queue.get(no_ack=False, fail=False, timeout=self.settings.publish_timeout)
                )
                try:
                    raw = await asyncio.shield(getting)
                except asyncio.CancelledError as exc:
                    # Ctrl-C mid-read. A basic.get cut off makes aiormq close the channel, and letters returned
                    # while others still wait in a quorum queue rotate it: the order is only kept by reading to
                    # the end and giving everything back (see _return_in_order). So the read goes on first.
                    cancelled = exc
                    raw = await getting
                if raw is None:
                    break
                message = _delivery_to_dead(dead_queue, snapshot.read, raw)
                snapshot.read += 1
                if (room is None or len(kept) < room) and keep(message):
                    kept.append(_Held(raw, message))
                elif raw.delivery_tag is not None:
                    snapshot.unkept.append(raw.delivery_tag)
            if cancelled is not None:
                raise cancelled  # after the finally below has given every letter back, in order
            yield snapshot
        finally:
            await _to_the_end(self._return_unsettled(channel, snapshot))

    async def _return_unsettled(self, channel: aio_pika.abc.AbstractChannel, snapshot: _Snapshot) -> None:
        """Give back every unsettled message, in order (see :meth:`_return_in_order`), and close the channel.

        In chunks of :data:`RETURN_CHUNK` delivery tags because RabbitMQ 3.10.8 puts back the first 33 messages
        of a larger return in order and the rest in hash order (measured: 100 letters came back as ``m0..m32``
        after ``m33..m99`` shuffled).
        """
        try:
            tags = sorted([*snapshot.unkept, *(h.raw.delivery_tag or 0 for h in snapshot.kept if not h.settled)])
            if tags and not channel.is_closed:
                await self._return_in_order(await channel.get_underlay_channel(), snapshot.queue, tags)
                for item in snapshot.kept:
                    item.settled = True
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _return_in_order(self, underlay: aiormq.abc.AbstractChannel, queue: str, tags: list[int]) -> None:
        """Return the messages of ``tags`` (ascending) on ``underlay``, chunk by chunk (see _return_unsettled).

        Before each chunk the queue's ready count is known; the next chunk goes once the count has grown by this
        one (the last one is waited for too). A count that grew by more means letters arrived meanwhile (a worker
        dead-lettering): a wait may then have passed before its chunk was in place, so the command warns that the
        order around them could not be checked. Without arrivals the order is kept exactly. The counts are read on
        a channel of their own: a failed read must not close the holding one. Without a count (it failed, or did
        not grow within a few seconds: something consumes the queue), the rest goes back at once, with a warning.
        """
        timeout = min(self.settings.publish_timeout, RETURN_WAIT_S)
        watcher = await self.connection.channel()
        try:
            try:
                ready: int | None = await _ready(watcher, queue)
            except Exception:  # no count, no order: the letters still go back
                ready = None
            arrived = 0
            returned = 0
            while returned < len(tags):
                chunk = min(RETURN_CHUNK, len(tags) - returned) if ready is not None else len(tags) - returned
                await underlay.basic_nack(delivery_tag=tags[returned + chunk - 1], multiple=True, requeue=True)
                returned += chunk
                if ready is None:
                    continue
                try:
                    shown = await _until_ready(watcher, queue, ready + chunk, timeout)
                except Exception:  # as above
                    shown = None
                if shown is None:
                    ready = None
                    continue
                arrived += shown - (ready + chunk)
                ready = shown
            if ready is None:
                self.warnings.append(
                    f"{queue}: the broker did not show the returned letters in time (is something consuming "
                    "it?); they went back at once, in the broker's order"
                )
            elif arrived:
                self.warnings.append(
                    f"{queue}: {arrived} letter(s) arrived while this command gave the others back; the order "
                    "of the returned letters around them could not be checked"
                )
        finally:
            if not watcher.is_closed:
                await watcher.close()

    async def _move(
        self,
        flt: DeadFilter | None,
        *,
        limit: int | None,
        rate: float | None,
        progress: Callable[[DeadMessage], None] | None,
        action: Callable[[DeadMessage], Any] | None,
    ) -> list[DeadMessage]:
        flt = flt or DeadFilter()
        interval = 1.0 / rate if rate else 0.0
        done: list[DeadMessage] = []
        missing: list[QueueNotFoundError] = []
        for dead_queue in self.dead_queues:
            if limit is not None and len(done) >= limit:
                break
            try:
                await self._require_queue(dead_queue)
            except QueueNotFoundError as exc:
                missing.append(exc)
                continue
            seen: set[str | None] = set()
            more = True
            async with self._locked(dead_queue):
                while more and (limit is None or len(done) < limit):
                    # One snapshot is held for at most hold_seconds, far below the broker's consumer timeout
                    # (30 min on 3.10), which would close the channel and take every held message back.
                    more = await self._move_batch(dead_queue, flt, limit, interval, progress, action, done, seen)
        _raise_if_all_missing(missing, len(self.dead_queues))
        return done

    async def _move_batch(  # noqa: PLR0917 - the state of one _move call, split for the time budget
        self,
        dead_queue: str,
        flt: DeadFilter,
        limit: int | None,
        interval: float,
        progress: Callable[[DeadMessage], None] | None,
        action: Callable[[DeadMessage], Any] | None,
        done: list[DeadMessage],
        seen: set[str | None],
    ) -> bool:
        """Process one snapshot; True when the time budget ran out with work left (take another snapshot).

        ``seen`` holds the ids handled in earlier snapshots of this run: a replayed message that a running
        worker dead-letters again meanwhile is not replayed a second time by the same command.
        """
        opened = time.monotonic()
        handled_here: set[str | None] = set()

        def wanted(message: DeadMessage) -> bool:
            return (message.message_id is None or message.message_id not in seen) and flt.matches(message)

        room = None if limit is None else limit - len(done)
        async with self._snapshot(dead_queue, wanted, room) as snapshot:
            for item in snapshot.kept:
                if limit is not None and len(done) >= limit:
                    return False
                message = item.message
                if handled_here and time.monotonic() - opened > self.hold_seconds:
                    seen.update(handled_here)
                    return True
                started = time.monotonic()
                if action is not None:
                    await action(message)
                try:
                    await item.raw.ack()
                except Exception as exc:
                    copy = "a copy was already published, so it now exists twice; " if action else ""
                    msg = (
                        f"could not remove {message.message_id} from {dead_queue} ({type(exc).__qualname__}: "
                        f"{exc}): {copy}{len(done)} were done before it. Run the same command again."
                    )
                    raise QueueableError(msg) from exc
                item.settled = True
                handled_here.add(message.message_id)
                done.append(message)
                if progress is not None:
                    progress(message)
                if interval:
                    await asyncio.sleep(max(interval - (time.monotonic() - started), 0.0))
        return False


async def _ready(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    """The ready count of ``queue`` (a passive declare)."""
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def _until_ready(
    channel: aio_pika.abc.AbstractChannel, queue: str, count: int, timeout: float
) -> int | None:
    """Wait until ``queue`` has at least ``count`` ready messages and return how many it has; ``None`` if it did
    not within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while (ready := await _ready(channel, queue)) < count:
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)
    return ready


def _raise_if_all_missing(missing: list[QueueNotFoundError], total: int) -> None:
    """A queue without a dead-letter queue yet has no dead letters; only when none exists is it an error."""
    if missing and len(missing) == total:
        if total == 1:
            raise missing[0]
        msg = f"none of the dead-letter queues exist: {'; '.join(str(m) for m in missing)}"
        raise QueueNotFoundError(msg)


# -- small helpers -------------------------------------------------------------------------------------------


def _is_not_found(exc: BaseException) -> bool:
    try:
        from aiormq.exceptions import ChannelNotFoundEntity  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, ChannelNotFoundEntity)


def _is_locked(exc: BaseException) -> bool:
    try:
        from aiormq.exceptions import ChannelLockedResource  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, ChannelLockedResource)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _as_int(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str | bytes):
        try:
            return int(value)
        except ValueError:
            return default
    return default


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    text = _text(value)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="milliseconds") if moment is not None else None


def _json_safe(value: Any) -> Any:  # noqa: PLR0911 - one branch per AMQP type
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return value
