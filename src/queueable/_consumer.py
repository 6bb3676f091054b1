"""What happens to one message: decode, look up the listener, resolve the service, invoke, decide.

This is the single decision function shared by every transport (the RabbitMQ consumer and the in-memory
transport), so they cannot disagree. It never acks or publishes; it returns an :data:`Outcome` and the transport
makes it durable:

- :class:`Handled`: the listener succeeded; ack.
- :class:`RetryLater`: publish ``message`` (same id, attempt + 1) after ``delay`` seconds, *then* ack.
- :class:`DeadLetter`: publish ``message`` (original body and headers plus the error) to the dead-letter
  queue, *then* ack.
"""

from __future__ import annotations

import asyncio
import enum
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from queueable import _wire
from queueable._dispatcher import call_listener, correlation_id
from queueable._events import event_name, event_version
from queueable.errors import ConfigurationError, Reject, Retry, UnknownServiceError

if TYPE_CHECKING:
    from collections.abc import Callable

    from pydantic import BaseModel

    from queueable._provider import Listener, ListenerProvider
    from queueable.abc import Container

__all__ = [
    "DEAD_SUFFIX",
    "DeadLetter",
    "DeadReason",
    "Handled",
    "Outcome",
    "Processor",
    "RetryLater",
    "dead_letter_queue_for",
    "original_queue_of",
    "replay_message",
    "slimmed",
]

DEAD_SUFFIX = ".dead"
MAX_ERROR_MESSAGE = 2_000
MAX_TRACEBACK = 8_000
DEFAULT_MAX_BODY_SIZE = 1_048_576  # 1 MiB
#: Content encodings that leave the body as it is (anything else, gzip say, would need decoding first).
_PLAIN_ENCODINGS = frozenset({"", "identity", "utf-8", "utf8"})


def dead_letter_queue_for(queue: str) -> str:
    """The dead-letter queue of work queue ``queue``."""
    return queue + DEAD_SUFFIX


class DeadReason(enum.StrEnum):
    """Why a message is in the dead-letter queue (header ``x-queueable-dead-reason``)."""

    RETRIES_EXHAUSTED = "retries_exhausted"  # the listener failed max_attempts times
    NON_RETRYABLE = "non_retryable"  # the listener raised an exception its policy never retries
    REJECTED = "rejected"  # the listener raised queueable.Reject
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    SCHEMA = "schema"  # valid JSON that fails the event model's validation
    MISSING_LISTENER = "missing_listener"  # no x-queueable-listener header
    UNKNOWN_LISTENER = "unknown_listener"  # a listener id this application did not register as queued
    UNKNOWN_EVENT = "unknown_event"  # an event name the listener's type does not cover
    UNSUPPORTED_VERSION = "unsupported_version"  # a newer schema version than this worker knows
    UNSUPPORTED_WIRE = "unsupported_wire"  # a wire format version other than the one this worker speaks
    BAD_HEADER = "bad_header"  # a queueable header whose value has the wrong type ("v2" as a version)
    OVERSIZED = "oversized"
    CONTENT_TYPE = "content_type"
    DELIVERY_LIMIT = "delivery_limit"  # the broker gave up redelivering it (the worker kept dying on it)


@dataclass(frozen=True, slots=True)
class Handled:
    """The listener ran without error: ack the message."""

    listener_id: str


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Publish ``message`` again after ``delay`` seconds; ack the original once that copy is durable."""

    delay: float
    message: _wire.OutgoingMessage
    error: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Publish ``message`` to its dead-letter queue; ack the original once that copy is durable."""

    reason: DeadReason
    message: _wire.OutgoingMessage
    error: str


Outcome = Handled | RetryLater | DeadLetter


class _BadInput(Exception):  # noqa: N818 - internal control flow
    def __init__(self, reason: DeadReason, detail: str, cause: BaseException | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.cause = cause  # an exception whose traceback the dead letter should carry
        super().__init__(detail)


class Processor:
    """Turns an :class:`~queueable._wire.IncomingMessage` into an :data:`Outcome`.

    Only listeners registered as queued in ``provider`` can be invoked: the listener id in a message is looked
    up in that allow-list, and the event name is resolved only among subclasses of that listener's event type.
    """

    def __init__(
        self,
        provider: ListenerProvider,
        container: Container | None = None,
        *,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        clock: Callable[[], float] = time.time,
        hostname: str | None = None,
        pid: int | None = None,
    ) -> None:
        self.provider = provider
        self.container = container if container is not None else provider.container
        self.max_body_size = max_body_size
        self.clock = clock
        self.hostname = hostname or socket.gethostname()
        self.pid = pid if pid is not None else os.getpid()

    async def process(self, message: _wire.IncomingMessage) -> Outcome:
        """Decide and run: the listener is invoked at most once per call."""
        try:
            entry, event = self._decode(message)
        except _BadInput as bad:
            return self._dead(message, bad.reason, error_type="BadMessage", error=bad.detail, exc=bad.cause)
        token = correlation_id.set(message.correlation_id)
        try:
            await call_listener(entry, event, self.container)
        except Exception as exc:
            return self._failed(message, entry, exc)
        except asyncio.CancelledError as exc:
            if _cancelling():
                raise  # the worker is stopping this handler: the transport requeues the message
            # The listener's own: it awaited something cancelled elsewhere. A failure like any other, not a
            # reason to end the worker's task.
            return self._failed(message, entry, exc)
        finally:
            correlation_id.reset(token)
        return Handled(entry.id)

    # -- decoding ----------------------------------------------------------------------------------

    def _decode(self, message: _wire.IncomingMessage) -> tuple[Listener, BaseModel]:
        self._check_envelope(message)
        listener_id = _listener_id(message)
        candidates = self.provider.queued(listener_id)
        if not candidates:
            msg = f"listener {listener_id!r} is not registered as a queued listener in this application"
            raise _BadInput(DeadReason.UNKNOWN_LISTENER, msg)
        entry, cls = self._event_class(candidates, _text(message.header(_wire.H_EVENT)))
        version = _header_int(message, _wire.H_VERSION)
        if version > event_version(cls):
            msg = (
                f"event {event_name(cls)!r} version {version} is newer than this worker's version "
                f"{event_version(cls)}: deploy the new code, then replay"
            )
            raise _BadInput(DeadReason.UNSUPPORTED_VERSION, msg)
        return entry, _parse(cls, message.body)

    def _check_envelope(self, message: _wire.IncomingMessage) -> None:
        """The checks that need no listener: wire version, content type, size."""
        wire = _header_int(message, _wire.H_WIRE)
        if wire != _wire.WIRE_VERSION:
            msg = (
                f"wire format version {wire} is not the version {_wire.WIRE_VERSION} this worker speaks: "
                "deploy a worker that does, then replay"
            )
            raise _BadInput(DeadReason.UNSUPPORTED_WIRE, msg)
        content_type = (message.content_type or "").split(";", 1)[0].strip().lower()
        if content_type not in {"", _wire.CONTENT_TYPE}:
            msg = f"content type {message.content_type!r} is not {_wire.CONTENT_TYPE}"
            raise _BadInput(DeadReason.CONTENT_TYPE, msg)
        encoding = (message.content_encoding or "").strip().lower()
        if encoding not in _PLAIN_ENCODINGS:
            msg = f"content encoding {message.content_encoding!r} is not supported: the body must be plain JSON"
            raise _BadInput(DeadReason.CONTENT_TYPE, msg)
        if len(message.body) > self.max_body_size:
            msg = f"body of {len(message.body)} bytes exceeds the limit of {self.max_body_size}"
            raise _BadInput(DeadReason.OVERSIZED, msg)

    def _event_class(self, candidates: tuple[Listener, ...], name: str | None) -> tuple[Listener, type[BaseModel]]:
        if name is None and len(candidates) > 1:
            types = ", ".join(event_name(entry.event_type) for entry in candidates)
            msg = (
                f"no {_wire.H_EVENT} header, and listener {candidates[0].id!r} listens to several event types "
                f"({types}): the message must say which"
            )
            raise _BadInput(DeadReason.UNKNOWN_EVENT, msg)
        for entry in candidates:
            if name is None:
                # A producer that sent only the listener header: the listener's own (concrete) type.
                return entry, entry.event_type
            try:
                cls = self.provider.events.resolve(name, within=entry.event_type)
            except ConfigurationError as exc:
                raise _BadInput(DeadReason.UNKNOWN_EVENT, str(exc)) from None
            if cls is not None:
                return entry, cls
        msg = f"event {name!r} is not a type that listener {candidates[0].id!r} listens to"
        raise _BadInput(DeadReason.UNKNOWN_EVENT, msg)

    # -- outcomes ----------------------------------------------------------------------------------

    def _failed(self, message: _wire.IncomingMessage, entry: Listener, exc: BaseException) -> Outcome:
        attempt = max(_int(message.header(_wire.H_ATTEMPT), default=1), 1)
        error_type = _qualified(type(exc))
        if isinstance(exc, Reject):
            return self._dead(message, DeadReason.REJECTED, error_type, exc.reason, exc)
        if isinstance(exc, UnknownServiceError) or not entry.retry.is_retryable(exc):
            return self._dead(message, DeadReason.NON_RETRYABLE, error_type, _describe(exc), exc)
        if attempt >= entry.retry.max_attempts:
            return self._dead(message, DeadReason.RETRIES_EXHAUSTED, error_type, _describe(exc), exc)
        delay = _usable_delay(exc.delay) if isinstance(exc, Retry) else None
        if delay is None:
            delay = entry.retry.delay_for(attempt)  # none asked for, or no usable one (a subclass can set any)
        now = _wire.iso_now(self.clock())
        headers = _own_headers(message.headers)
        headers[_wire.H_ATTEMPT] = attempt + 1
        headers.setdefault(_wire.H_FIRST_FAILURE, now)
        headers[_wire.H_LAST_FAILURE] = now
        headers[_wire.H_ERROR_TYPE] = error_type
        headers[_wire.H_ERROR_MESSAGE] = _bounded(_describe(exc), MAX_ERROR_MESSAGE)
        return RetryLater(delay, message.to_outgoing(message.queue, headers), headers[_wire.H_ERROR_MESSAGE])

    def oversized(self, message: _wire.IncomingMessage, refused: RetryLater | DeadLetter) -> DeadLetter:
        """The last resort for a copy that does not fit in one frame even without its traceback (the message's
        own headers nearly fill it): a dead letter (reason ``oversized``) with the body and queueable's own
        headers, naming the producer's headers it leaves out in ``x-queueable-dropped-headers``.
        """
        own = {k: v for k, v in message.headers.items() if k.startswith("x-queueable-")}
        dropped = sorted(k for k in message.headers if k not in own and k not in _BROKER_HEADERS)
        own[_wire.H_DROPPED_HEADERS] = _bounded(", ".join(dropped), 1_000)
        cause = _bounded(refused.error, SLIM_ERROR_MESSAGE)
        error = (
            f"its headers leave no room in one AMQP frame for a copy with the error: left out header(s) "
            f"{', '.join(dropped) or '(none)'}; the listener's error was: {cause}"
        )
        return self._dead(replace(message, headers=own), DeadReason.OVERSIZED, "MessageTooLarge", error, exc=None)

    def _dead(
        self,
        message: _wire.IncomingMessage,
        reason: DeadReason,
        error_type: str,
        error: str,
        exc: BaseException | None,
    ) -> DeadLetter:
        now = _wire.iso_now(self.clock())
        headers = _own_headers(message.headers)
        headers.setdefault(_wire.H_FIRST_FAILURE, now)
        headers.update(
            {
                _wire.H_DEAD_REASON: str(reason),
                _wire.H_ERROR_TYPE: error_type,
                _wire.H_ERROR_MESSAGE: _bounded(error, MAX_ERROR_MESSAGE),
                _wire.H_LAST_FAILURE: now,
                _wire.H_DEAD_AT: now,
                _wire.H_ORIGINAL_QUEUE: message.queue,
                _wire.H_CONSUMER_HOST: self.hostname,
                _wire.H_CONSUMER_PID: self.pid,
            }
        )
        headers.setdefault(_wire.H_ATTEMPT, 1)
        if message.content_encoding:  # the copy has no such property: the header keeps what the body is
            headers[_wire.H_CONTENT_ENCODING] = message.content_encoding
        if exc is not None:
            formatted = "".join(traceback.format_exception(exc))
            headers[_wire.H_ERROR_TRACEBACK] = _bounded(formatted, MAX_TRACEBACK, keep="end")
        out = message.to_outgoing(dead_letter_queue_for(message.queue), headers)
        return DeadLetter(reason, out, headers[_wire.H_ERROR_MESSAGE])  # bounded: it is logged too


def _listener_id(message: _wire.IncomingMessage) -> str:
    raw = message.header(_wire.H_LISTENER)
    if raw is not None and not isinstance(raw, str | bytes):
        msg = f"header {_wire.H_LISTENER} is {_shown(raw)}, not a listener id string"
        raise _BadInput(DeadReason.BAD_HEADER, msg)
    listener_id = _text(raw)
    if not listener_id:
        msg = f"no {_wire.H_LISTENER} header: cannot tell which listener the message is for"
        raise _BadInput(DeadReason.MISSING_LISTENER, msg)
    return listener_id


def _parse(cls: type[BaseModel], body: bytes) -> BaseModel:
    """``body`` validated as ``cls``; every failure, whatever a validator raises, is a ``_BadInput``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"body is not UTF-8: {exc}"
        raise _BadInput(DeadReason.NOT_UTF8, msg) from None
    try:
        return cls.model_validate_json(text)
    except ValidationError as exc:
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            msg = f"body is not JSON: {exc.errors()[0]['msg']}"
            raise _BadInput(DeadReason.NOT_JSON, msg) from None
        msg = f"body does not match {event_name(cls)!r} v{event_version(cls)}: {exc}"
        raise _BadInput(DeadReason.SCHEMA, _bounded(msg, MAX_ERROR_MESSAGE)) from None
    except Exception as exc:  # a validator that raises something pydantic does not wrap (TypeError, ...)
        msg = (
            f"validating the body as {event_name(cls)!r} v{event_version(cls)} raised "
            f"{_qualified(type(exc))}: {_describe(exc)}"
        )
        raise _BadInput(DeadReason.SCHEMA, _bounded(msg, MAX_ERROR_MESSAGE), exc) from None


SLIM_ERROR_MESSAGE = 200


def slimmed(outcome: RetryLater | DeadLetter) -> RetryLater | DeadLetter | None:
    """``outcome`` with a copy that takes less room: no traceback, the error message cut to 200 characters
    (``None`` if there is nothing to cut). For a copy a transport refused as too large.
    """
    headers = dict(outcome.message.headers)
    changed = headers.pop(_wire.H_ERROR_TRACEBACK, None) is not None
    error = headers.get(_wire.H_ERROR_MESSAGE)
    if isinstance(error, str) and len(error) > SLIM_ERROR_MESSAGE:
        headers[_wire.H_ERROR_MESSAGE] = _bounded(error, SLIM_ERROR_MESSAGE)
        changed = True
    if not changed:
        return None
    return replace(outcome, message=replace(outcome.message, headers=headers))


#: Headers the broker adds on its own (dead-lettering history, quorum delivery counts). A copy the worker
#: publishes is a new message: carrying them over would make it look broker-dead-lettered, or count twice.
_BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


def _own_headers(headers: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in headers.items() if k not in _BROKER_HEADERS}


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _usable_delay(delay: object) -> float | None:
    """``delay`` as seconds if it is a finite number >= 0 (an int too large for a float is not)."""
    if not isinstance(delay, int | float) or isinstance(delay, bool):
        return None
    try:
        seconds = float(delay)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _cancelling() -> bool:
    """Whether the running task has been asked to stop (as opposed to meeting someone else's cancellation)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _header_int(message: _wire.IncomingMessage, name: str, *, default: int = 1) -> int:
    """An integer header: ``default`` when absent; ``_BadInput(BAD_HEADER)`` when it is not an integer.

    Accepted: an int, an integral float (``2.0``, as some producers' AMQP libraries send numbers), or the
    digits of one as text. A header read as a default when it said something else would run a message under
    rules it did not ask for.
    """
    value = message.header(name)
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str | bytes):
        try:
            return int(value.strip())
        except ValueError:
            pass
    msg = f"header {name} is {_shown(value)}, not an integer"
    raise _BadInput(DeadReason.BAD_HEADER, msg)


def _shown(value: Any) -> str:
    """A header value for an error message: its repr, bounded, and its type."""
    return f"{_bounded(repr(value), 80)} ({type(value).__name__})"


def _int(value: Any, *, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, (str, bytes)):
        try:
            return int(value)
        except ValueError:
            return default
    return default


def _qualified(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        return "listener timed out"
    return text or type(exc).__qualname__


def _bounded(text: str, limit: int, *, keep: str = "start") -> str:
    if len(text) <= limit:
        return text
    marker = " …[truncated]… "
    if keep == "end":
        return marker + text[-(limit - len(marker)) :]
    return text[: limit - len(marker)] + marker


_FAILURE_HEADERS = (
    _wire.H_DEAD_REASON,
    _wire.H_ERROR_TYPE,
    _wire.H_ERROR_MESSAGE,
    _wire.H_ERROR_TRACEBACK,
    _wire.H_FIRST_FAILURE,
    _wire.H_LAST_FAILURE,
    _wire.H_DEAD_AT,
    _wire.H_ORIGINAL_QUEUE,
    _wire.H_CONSUMER_HOST,
    _wire.H_CONSUMER_PID,
)


def replay_message(dead: _wire.IncomingMessage) -> _wire.OutgoingMessage:
    """The copy of a dead letter that goes back to its work queue: attempt 1, failure headers gone,
    ``x-queueable-replays`` incremented. Same body, message id and correlation id.
    """
    headers = {k: v for k, v in _own_headers(dead.headers).items() if k not in _FAILURE_HEADERS}
    headers[_wire.H_ATTEMPT] = 1
    headers[_wire.H_REPLAYS] = _int(dead.header(_wire.H_REPLAYS), default=0) + 1
    return dead.to_outgoing(original_queue_of(dead), headers)


def original_queue_of(dead: _wire.IncomingMessage) -> str:
    """The work queue a dead letter came from."""
    original = _text(dead.header(_wire.H_ORIGINAL_QUEUE))
    if original:
        return original
    if dead.queue.endswith(DEAD_SUFFIX):
        return dead.queue[: -len(DEAD_SUFFIX)]
    return dead.queue
