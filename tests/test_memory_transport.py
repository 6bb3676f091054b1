"""The in-memory transport runs queued listeners by the real consumer's rules: retry, dead letters, bad input."""

from __future__ import annotations

import asyncio
import json

import pytest

from queueable import (
    App,
    Container,
    DeadReason,
    Handled,
    OutgoingMessage,
    PublishError,
    Reject,
    Retry,
    RetryLater,
    RetryPolicy,
    Settings,
    TransportClosedError,
)
from queueable import _wire as wire
from queueable.testing import ManualClock, MemoryTransport, TestTransport
from tests.fakes import CommentPosted, Mailer, Recorder

COMMENT = CommentPosted(post_id=7, author="ann", text="first!")
NO_JITTER = RetryPolicy(max_attempts=3, initial_delay=10, multiplier=3, jitter=0)


@pytest.fixture(name="mailer")
def fixture_mailer(recorder: Recorder) -> Mailer:
    return Mailer(recorder)


@pytest.fixture(name="app")
def fixture_app(mailer: Mailer) -> App:
    container = Container()
    container.register_instance("mailer", mailer)
    app = App(container=container, settings=Settings(url="memory://"))
    app.add_listener_service("mailer", "notify_author", queue=True, retry=NO_JITTER)
    app.add_listener_service("mailer", "always_fails", queue=True, retry=NO_JITTER)
    return app


async def test_dispatch_queues_and_nothing_runs_until_the_test_says_so(app: App, recorder: Recorder):
    """Queued listeners are messages first: dispatch returns with both pending, none called."""
    async with TestTransport(app) as transport:
        await app.dispatch(COMMENT)
        assert transport.pending == 2
        assert recorder.calls == []


async def test_failing_listener_is_dead_lettered_after_max_attempts(app: App, recorder: Recorder):
    """3 attempts 10 s and 30 s apart, then a dead letter recording the error, attempts and times."""
    async with TestTransport(app) as transport:
        await app.dispatch(COMMENT)
        start = transport.clock()
        processed = await transport.run_until_idle(advance_time=True)

    fails = [p for p in processed if p.message.headers[wire.H_LISTENER] == "mailer:always_fails"]
    assert [type(p.outcome).__name__ for p in fails] == ["RetryLater", "RetryLater", "DeadLetter"]
    assert [p.at - start for p in fails] == [0, 10, 40]
    assert [p.message.headers[wire.H_ATTEMPT] for p in fails] == [1, 2, 3]
    assert recorder.names.count("always_fails") == 3

    (dead,) = transport.dead_letters
    headers = dead.message.headers
    assert dead.reason is DeadReason.RETRIES_EXHAUSTED
    assert dead.message.queue == "queueable.dead"
    assert headers[wire.H_ERROR_TYPE] == "RuntimeError"
    assert headers[wire.H_ERROR_MESSAGE] == "cannot mail about post 7"
    assert "raise RuntimeError(msg)" in headers[wire.H_ERROR_TRACEBACK]
    assert headers[wire.H_ATTEMPT] == 3
    assert headers[wire.H_FIRST_FAILURE] == wire.iso_now(start)
    assert headers[wire.H_LAST_FAILURE] == wire.iso_now(start + 40)
    assert headers[wire.H_ORIGINAL_QUEUE] == "queueable"
    assert headers[wire.H_LISTENER] == "mailer:always_fails"
    assert isinstance(headers[wire.H_CONSUMER_PID], int)
    assert CommentPosted.model_validate_json(dead.message.body) == COMMENT
    assert dead.message.message_id == fails[0].message.message_id


async def test_listener_failing_twice_then_succeeding_is_not_dead_lettered(app: App, mailer: Mailer):
    """A transient failure is retried and then handled; the sibling listener's failures do not affect it."""
    mailer.failures = 2
    async with TestTransport(app) as transport:
        await app.dispatch(COMMENT)
        processed = await transport.run_until_idle(advance_time=True)
    notify = [p.outcome for p in processed if p.message.headers[wire.H_LISTENER] == "mailer:notify_author"]
    assert [type(o).__name__ for o in notify] == ["RetryLater", "RetryLater", "Handled"]
    assert [d.message.headers[wire.H_LISTENER] for d in transport.dead_letters] == ["mailer:always_fails"]


async def test_retry_waits_for_the_clock(app: App, mailer: Mailer):
    """A retry is not run before its delay has passed."""
    mailer.failures = 1
    async with TestTransport(app) as transport:
        await app.dispatch(COMMENT)
        await transport.run_until_idle()
        assert [due - transport.clock() for due, _ in transport.delayed] == [10, 10]
        transport.clock.advance(9.9)
        assert await transport.run_until_idle() == []
        transport.clock.advance(0.1)
        assert len(await transport.run_until_idle()) == 2


@pytest.fixture(name="controlled_app")
def fixture_controlled_app() -> App:
    app = App(settings=Settings(url="memory://"))

    class Control:
        async def reject(self, event: CommentPosted) -> None:
            raise Reject("spam")

        async def retry_soon(self, event: CommentPosted) -> None:
            raise Retry("rate limited", delay=0.5)

        async def value_error(self, event: CommentPosted) -> None:
            msg = "bad address"
            raise ValueError(msg)

        async def slow(self, event: CommentPosted) -> None:
            await asyncio.sleep(5)

    app.container.register("control", Control)  # type: ignore[attr-defined]
    app.add_listener_service("control", "reject", queue=True)
    app.add_listener_service("control", "retry_soon", queue=True, retry=RetryPolicy(max_attempts=2))
    app.add_listener_service("control", "value_error", queue=True, retry=RetryPolicy(dont_retry=(ValueError,)))
    app.add_listener_service("control", "slow", queue=True, timeout=0.01, retry=RetryPolicy.never())
    return app


async def test_control_exceptions_and_policies(controlled_app: App):
    """Reject and dont_retry go straight to dead letters; Retry(delay) sets the delay; timeouts fail."""
    async with TestTransport(controlled_app) as transport:
        await controlled_app.dispatch(COMMENT)
        first = {p.message.headers[wire.H_LISTENER]: p.outcome for p in await transport.run_until_idle()}

    reasons = {k: getattr(v, "reason", None) for k, v in first.items()}
    assert reasons["control:reject"] is DeadReason.REJECTED
    assert reasons["control:value_error"] is DeadReason.NON_RETRYABLE
    assert reasons["control:slow"] is DeadReason.RETRIES_EXHAUSTED
    assert first["control:slow"].message.headers[wire.H_ERROR_TYPE] == "TimeoutError"
    retry = first["control:retry_soon"]
    assert isinstance(retry, RetryLater)
    assert retry.delay == 0.5
    assert retry.message.headers[wire.H_ERROR_MESSAGE] == "rate limited"


def _raw(queue: str = "queueable", body: bytes = b'{"post_id":1,"author":"a","text":"t"}', **headers: object):
    base: dict[str, object] = {
        wire.H_LISTENER: "mailer:notify_author",
        wire.H_EVENT: "blog.comment_posted",
        wire.H_VERSION: 1,
    }
    base.update({k.replace("_", "-"): v for k, v in headers.items()})
    return OutgoingMessage(queue=queue, body=body, headers={k: v for k, v in base.items() if v is not None})


BAD_INPUTS = [
    pytest.param(_raw(body=b"not json"), DeadReason.NOT_JSON, id="not-json"),
    pytest.param(_raw(body=b'{"post_id": "\xff"}'), DeadReason.NOT_UTF8, id="not-utf8"),
    pytest.param(_raw(body=b'{"post_id": "seven"}'), DeadReason.SCHEMA, id="schema"),
    pytest.param(
        _raw(**{"x-queueable-listener": "os:system"}), DeadReason.UNKNOWN_LISTENER, id="unknown-listener"
    ),
    pytest.param(_raw(**{"x-queueable-listener": None}), DeadReason.MISSING_LISTENER, id="missing-listener"),
    pytest.param(_raw(**{"x-queueable-event": "os.environ"}), DeadReason.UNKNOWN_EVENT, id="unknown-event"),
    pytest.param(_raw(**{"x-queueable-event-version": 9}), DeadReason.UNSUPPORTED_VERSION, id="newer-version"),
    pytest.param(_raw(body=b" " * 2048), DeadReason.OVERSIZED, id="oversized"),
    pytest.param(_raw(**{"x-queueable-event-version": 9.0}), DeadReason.UNSUPPORTED_VERSION, id="newer-as-float"),
    pytest.param(_raw(**{"x-queueable-event-version": "v2"}), DeadReason.BAD_HEADER, id="version-not-a-number"),
    pytest.param(_raw(**{"x-queueable-event-version": True}), DeadReason.BAD_HEADER, id="version-a-bool"),
    pytest.param(_raw(**{"x-queueable-event-version": 1.5}), DeadReason.BAD_HEADER, id="version-a-fraction"),
    pytest.param(_raw(**{"x-queueable-wire": 2}), DeadReason.UNSUPPORTED_WIRE, id="newer-wire"),
    pytest.param(_raw(**{"x-queueable-wire": "one"}), DeadReason.BAD_HEADER, id="wire-not-a-number"),
    pytest.param(_raw(**{"x-queueable-listener": 7}), DeadReason.BAD_HEADER, id="listener-not-text"),
]


@pytest.mark.parametrize(("message", "reason"), BAD_INPUTS)
async def test_bad_input_is_dead_lettered_with_its_reason(app: App, recorder: Recorder, message, reason):
    """Every kind of bad input becomes a dead letter with a specific reason; no listener runs."""
    app.settings = app.settings.merged(max_body_size=1024)
    async with TestTransport(app) as transport:
        await transport.publish([message])
        (processed,) = await transport.run_until_idle()
    assert processed.outcome.reason is reason  # type: ignore[union-attr]
    assert transport.dead_letters[0].message.body == message.body
    assert transport.dead_letters[0].message.headers[wire.H_DEAD_REASON] == reason
    assert recorder.calls == []


@pytest.mark.parametrize(("encoding", "handled"), [("gzip", False), ("identity", True), ("UTF-8", True)])
async def test_a_content_encoding_that_changes_the_body_is_refused(app: App, encoding: str, handled: bool):
    """Only encodings that leave the body as it is are read (the Processor decides for every transport)."""
    message = wire.IncomingMessage(
        queue="queueable",
        body=b'{"post_id":1,"author":"a","text":"t"}',
        headers=dict(_raw().headers),
        content_encoding=encoding,
    )
    outcome = await app.processor().process(message)
    assert isinstance(outcome, Handled) is handled
    if not handled:
        assert outcome.reason is DeadReason.CONTENT_TYPE  # type: ignore[union-attr]
        assert outcome.message.headers[wire.H_CONTENT_ENCODING] == encoding  # type: ignore[union-attr]


async def test_wrong_content_type_is_dead_lettered(app: App):
    """A message that says it is not JSON is refused as such."""
    from dataclasses import replace  # noqa: PLC0415

    async with TestTransport(app) as transport:
        await transport.publish([replace(_raw(), content_type="application/x-python-pickle")])
        (processed,) = await transport.run_until_idle()
    assert processed.outcome.reason is DeadReason.CONTENT_TYPE  # type: ignore[union-attr]


async def test_message_without_event_header_uses_the_listener_type(app: App, recorder: Recorder):
    """A producer in another language may send only the listener id: the listener's own type is used."""
    async with TestTransport(app) as transport:
        await transport.publish([_raw(**{"x-queueable-event": None, "x-queueable-event-version": None})])
        (processed,) = await transport.run_until_idle()
    assert isinstance(processed.outcome, Handled)
    assert recorder.calls == [("notify_author", CommentPosted(post_id=1, author="a", text="t"))]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"x-queueable-wire": 1, "x-queueable-event-version": 1}, id="ints"),
        pytest.param({"x-queueable-wire": 1.0, "x-queueable-event-version": 1.0}, id="integral-floats"),
        pytest.param({"x-queueable-wire": "1", "x-queueable-event-version": b" 1"}, id="digits"),
        pytest.param({"x-queueable-wire": None, "x-queueable-event-version": None}, id="absent"),
    ],
)
async def test_number_headers_other_producers_send_are_read(app: App, recorder: Recorder, headers):
    """Other languages' AMQP libraries send numbers as floats or text: an integral one is that integer."""
    async with TestTransport(app) as transport:
        await transport.publish([_raw(**headers)])
        (processed,) = await transport.run_until_idle()
    assert isinstance(processed.outcome, Handled)
    assert len(recorder.calls) == 1


async def test_a_validator_that_raises_a_non_validation_error_dead_letters_with_its_traceback():
    """pydantic wraps only ValueError and AssertionError; anything else a validator raises is still a schema
    dead letter for that message, with the traceback, and the message is not lost or retried forever.
    """
    from pydantic import BaseModel, field_validator  # noqa: PLC0415

    from queueable import event  # noqa: PLC0415

    @event("tests.memory.strict")
    class Strict(BaseModel):
        code: str

        @field_validator("code")
        @classmethod
        def _check(cls, value: str) -> str:
            if value == "boom":
                return value + 1  # type: ignore[operator]  # TypeError, which pydantic does not wrap
            return value

    calls: list[str] = []

    async def handle(evt: Strict) -> None:
        calls.append(evt.code)

    app = App(settings=Settings(url="memory://"))
    entry = app.add_listener(handle, Strict, queue=True, id="tests:strict")
    async with TestTransport(app) as transport:
        body = b'{"code": "boom"}'
        headers = {wire.H_LISTENER: entry.id, wire.H_EVENT: "tests.memory.strict"}
        await transport.publish([OutgoingMessage(queue=entry.queue_name, body=body, headers=headers)])
        (processed,) = await transport.run_until_idle()
        assert transport.pending == 0
    assert processed.outcome.reason is DeadReason.SCHEMA  # type: ignore[union-attr]
    (letter,) = transport.dead_letters
    assert "raised TypeError" in letter.message.headers[wire.H_ERROR_MESSAGE]
    assert "return value + 1" in letter.message.headers[wire.H_ERROR_TRACEBACK]
    assert calls == []


async def test_a_message_the_processor_cannot_decide_stays_queued(app: App, monkeypatch):
    """If deciding raises (a bug), the message goes back to the front of its queue, as a worker requeues."""
    async with TestTransport(app) as transport:
        await transport.publish([_raw()])

        async def broken(message: object) -> None:
            msg = "processor bug"
            raise RuntimeError(msg)

        monkeypatch.setattr(transport._require_processor(), "process", broken)
        with pytest.raises(RuntimeError, match="processor bug"):
            await transport.run_once()
        assert transport.pending == 1
        monkeypatch.undo()
        (processed,) = await transport.run_until_idle()
        assert isinstance(processed.outcome, Handled)


async def test_without_an_event_header_a_listener_of_several_types_is_ambiguous():
    """A producer that sends only the listener id of a listener registered for two event types: the worker
    cannot know which model the body is, so it dead-letters the message instead of picking the first.
    """
    from tests.fakes import PostPublished  # noqa: PLC0415

    calls: list[object] = []

    async def audit(evt: object) -> None:
        calls.append(evt)

    app = App(settings=Settings(url="memory://"))
    app.add_listener(audit, CommentPosted, queue=True, id="tests:audit")
    app.add_listener(audit, PostPublished, queue=True, id="tests:audit")
    async with TestTransport(app) as transport:
        headers = {wire.H_LISTENER: "tests:audit"}
        await transport.publish([OutgoingMessage(queue="queueable", body=b'{"post_id": 1}', headers=headers)])
        (processed,) = await transport.run_until_idle()
    assert processed.outcome.reason is DeadReason.UNKNOWN_EVENT  # type: ignore[union-attr]
    assert "listens to several event types" in processed.outcome.error  # type: ignore[union-attr]
    assert calls == []


async def test_publishing_to_an_unknown_queue_is_unroutable(app: App):
    """Like mandatory publishing on RabbitMQ: no queue, no silent drop."""
    async with TestTransport(app) as transport:
        with pytest.raises(PublishError, match="unroutable: no queue named elsewhere"):
            await transport.publish([_raw(queue="elsewhere")])
        assert transport.pending == 0


async def test_closed_transport_refuses_to_publish(app: App):
    """Publishing after close() is an error, not a lost message."""
    transport = MemoryTransport(app.processor(), clock=ManualClock())
    await transport.close()
    with pytest.raises(TransportClosedError):
        await transport.publish([_raw()])


async def test_replay_resets_attempts_and_counts_replays(app: App, mailer: Mailer):
    """A replayed dead letter starts again at attempt 1, with the replay counted and errors cleared."""
    mailer.failures = 100
    async with TestTransport(app) as transport:
        await app.dispatch(COMMENT)
        await transport.run_until_idle(advance_time=True)
        assert len(transport.dead_letters) == 2
        mailer.failures = 0
        assert await transport.replay("queueable.dead") == 2
        again = await transport.run_until_idle()
    notify = next(p for p in again if p.message.headers[wire.H_LISTENER] == "mailer:notify_author")
    assert isinstance(notify.outcome, Handled)
    assert notify.message.headers[wire.H_ATTEMPT] == 1
    assert notify.message.headers[wire.H_REPLAYS] == 1
    assert wire.H_ERROR_TYPE not in notify.message.headers
    # always_fails starts over at attempt 1, so it is waiting for its first retry, not dead again.
    assert transport.dead_letters == []
    ((_, waiting),) = transport.delayed
    assert waiting.headers[wire.H_LISTENER] == "mailer:always_fails"
    assert waiting.headers[wire.H_ATTEMPT] == 2


async def test_embedded_mode_runs_queued_listeners_after_dispatch(recorder: Recorder, caplog):
    """Without a broker URL, queued listeners run in the background after dispatch, with a warning."""
    container = Container()
    container.register_instance("mailer", Mailer(recorder))
    app = App(container=container, settings=Settings())
    app.add_listener_service("mailer", "notify_author", queue=True)
    async with app:
        await app.dispatch(COMMENT)
        assert recorder.calls == []  # dispatch returned before the listener ran
    assert recorder.names == ["notify_author"]
    assert "QUEUEABLE_URL is not set" in caplog.text


async def test_embedded_mode_retries_with_real_delays(recorder: Recorder):
    """Embedded retries wait for real time and then succeed."""
    container = Container()
    mailer = Mailer(recorder, failures=1)
    container.register_instance("mailer", mailer)
    app = App(container=container, settings=Settings(url="memory://"))
    policy = RetryPolicy(initial_delay=0.05, jitter=0)
    app.add_listener_service("mailer", "notify_author", queue=True, retry=policy)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with app:
        await app.dispatch(COMMENT)
    assert recorder.names == ["notify_author", "notify_author"]
    assert loop.time() - started >= 0.05


async def test_embedded_mode_runs_every_retry_when_its_time_comes():
    """Each retry runs at its own time: the timer is set again for the next one after the earliest has run."""
    runs: dict[str, int] = {}

    async def flaky(evt: CommentPosted) -> None:
        runs[evt.author] = runs.get(evt.author, 0) + 1
        if runs[evt.author] == 1:
            raise Retry(delay=0.05 if evt.author == "fast" else 0.3)

    app = App(settings=Settings(url="memory://"))
    app.add_listener(flaky, CommentPosted, queue=True, id="tests:flaky")
    transport = app.transport
    assert isinstance(transport, MemoryTransport)
    async with app:
        await app.dispatch(CommentPosted(post_id=1, author="fast", text="t"))
        await app.dispatch(CommentPosted(post_id=2, author="slow", text="t"))
        for _ in range(200):  # up to 2 s; the slow retry is due after 0.3 s
            if runs.get("slow") == 2:
                break
            await asyncio.sleep(0.01)
        assert runs == {"fast": 2, "slow": 2}, "a later retry waited for something else to wake the transport"
        assert transport.delayed == []


async def test_a_retry_delay_that_cannot_be_scheduled_falls_back_to_the_policy(app: App):
    """A ``Retry`` subclass can set any delay; a non-finite or negative one uses the policy's backoff."""

    delays: list[object] = [float("inf"), float("nan"), -1, 10**400, True, "5"]

    class Odd(Retry):
        def __init__(self) -> None:
            super().__init__("odd")
            self.delay = delays.pop(0)  # type: ignore[assignment]

    async def odd(evt: CommentPosted) -> None:
        raise Odd

    app.add_listener(odd, CommentPosted, queue=True, id="tests:odd", retry=NO_JITTER)
    async with TestTransport(app) as transport:
        for _ in range(6):
            await transport.publish([_raw(**{"x-queueable-listener": "tests:odd"})])
        processed = await transport.run_until_idle()
    assert [record.outcome.delay for record in processed] == [10] * 6  # type: ignore[union-attr]  # NO_JITTER's first


async def test_the_error_an_outcome_carries_for_the_log_is_bounded_like_its_header(app: App):
    """The worker logs ``outcome.error``: a listener's 3,000-character message is cut there as in the header."""

    async def wordy(evt: CommentPosted) -> None:
        raise RuntimeError("x" * 3_000)

    app.add_listener(wordy, CommentPosted, queue=True, id="tests:wordy", retry=NO_JITTER)
    async with TestTransport(app) as transport:
        await transport.publish([_raw(**{"x-queueable-listener": "tests:wordy"})])
        processed = await transport.run_until_idle(advance_time=True)
    outcomes = [record.outcome for record in processed]
    assert [type(outcome).__name__ for outcome in outcomes] == ["RetryLater", "RetryLater", "DeadLetter"]
    for outcome in outcomes:
        assert 1_900 < len(outcome.error) <= 2_000  # type: ignore[union-attr]
        assert outcome.error == outcome.message.headers[wire.H_ERROR_MESSAGE]  # type: ignore[union-attr]


async def test_message_body_is_the_event_json(app: App):
    """The body is the event's JSON and nothing else, so other languages can produce it."""
    async with TestTransport(app) as transport:
        await app.dispatch(COMMENT)
        message = transport.queues["queueable"][0]
    assert json.loads(message.body) == {"post_id": 7, "author": "ann", "text": "first!"}


async def test_copies_drop_the_broker_s_own_headers(app: App):
    """Retry copies and dead letters are new messages: x-death and x-delivery-count are not carried over."""
    broker_said = {"x-death": [{"reason": "expired", "count": 3}], "x-delivery-count": 2}
    async with TestTransport(app) as transport:
        await transport.publish([_raw(body=b"not json", **broker_said)])
        await transport.publish([_raw(**{"x-queueable-listener": "mailer:always_fails"}, **broker_said)])
        processed = await transport.run_until_idle()
    for record in processed:
        copy = record.outcome.message  # type: ignore[union-attr]
        assert "x-death" not in copy.headers
        assert "x-delivery-count" not in copy.headers
        assert record.message.headers["x-delivery-count"] == 2
