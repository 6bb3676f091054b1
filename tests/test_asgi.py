"""DeferredDispatchMiddleware through a real Starlette app: events leave only after the response is sent."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from queueable import EventDispatcher, ListenerProvider, PublishError, SerializationError
from queueable.asgi import DeferredDispatchMiddleware
from tests.fakes import Broken, CommentPosted, RecordingTransport

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from starlette.requests import Request

    from queueable import OutgoingMessage


class GatedTransport(RecordingTransport):
    """A transport whose publish blocks until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.done = asyncio.Event()

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        self.started.set()
        await self.gate.wait()
        await super().publish(messages)
        self.done.set()


@pytest.fixture(name="gated")
def fixture_gated() -> GatedTransport:
    return GatedTransport()


@pytest.fixture(name="dispatcher")
def fixture_dispatcher(provider: ListenerProvider, gated: GatedTransport) -> EventDispatcher:
    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    return EventDispatcher(provider, gated)


def make_app(dispatcher: EventDispatcher, **options: object) -> Starlette:
    async def comment(request: Request) -> JSONResponse:
        post_id = int(request.path_params["post_id"])
        await dispatcher.dispatch(CommentPosted(post_id=post_id, author="ann", text="hi"))
        await dispatcher.dispatch(CommentPosted(post_id=post_id + 1, author="ann", text="hi"))
        return JSONResponse({"ok": True})

    async def crash(request: Request) -> JSONResponse:
        await dispatcher.dispatch(CommentPosted(post_id=1, author="ann", text="hi"))
        msg = "handler bug"
        raise RuntimeError(msg)

    async def unavailable(request: Request) -> PlainTextResponse:
        await dispatcher.dispatch(CommentPosted(post_id=1, author="ann", text="hi"))
        return PlainTextResponse("try later", status_code=503)

    async def conflict(request: Request) -> PlainTextResponse:
        await dispatcher.dispatch(CommentPosted(post_id=1, author="ann", text="hi"))
        raise HTTPException(409, "already there")

    async def failing_background() -> None:
        msg = "background job bug"
        raise RuntimeError(msg)

    async def with_background(request: Request) -> PlainTextResponse:
        await dispatcher.dispatch(CommentPosted(post_id=1, author="ann", text="hi"))
        return PlainTextResponse("ok", background=BackgroundTask(failing_background))

    return Starlette(
        routes=[
            Route("/comment/{post_id}", comment, methods=["POST"]),
            Route("/crash", crash, methods=["POST"]),
            Route("/unavailable", unavailable, methods=["POST"]),
            Route("/conflict", conflict, methods=["POST"]),
            Route("/background", with_background, methods=["POST"]),
        ],
        middleware=[Middleware(DeferredDispatchMiddleware, dispatcher=dispatcher, **options)],
    )


@pytest.fixture(name="server_url")
async def fixture_server_url(dispatcher: EventDispatcher) -> AsyncIterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(dispatcher), lifespan="off", ws="none", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await asyncio.wait_for(task, 10)
    sock.close()


async def test_the_response_reaches_the_client_while_the_publish_is_still_blocked(
    server_url: str, gated: GatedTransport
):
    """Over a real uvicorn server the client has its full response before the broker confirmed anything."""
    async with httpx.AsyncClient() as client:
        response = await asyncio.wait_for(client.post(f"{server_url}/comment/7"), 5)
    assert response.status_code == 200
    assert response.json() == {"ok": True}

    await asyncio.wait_for(gated.started.wait(), 5)  # the flush began after the response...
    assert gated.messages == []  # ...and is still waiting for the broker
    gated.gate.set()
    await asyncio.wait_for(gated.done.wait(), 5)

    assert len(gated.batches) == 1
    assert [CommentPosted.model_validate_json(m.body).post_id for m in gated.messages] == [7, 8]


async def test_an_exception_in_the_endpoint_discards_the_events(
    dispatcher: EventDispatcher, gated: GatedTransport
):
    """A handler that raises gets a 500 and its dispatched events are never published."""
    gated.gate.set()
    transport = httpx.ASGITransport(make_app(dispatcher), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/crash")
    assert response.status_code == 500
    assert not gated.started.is_set()


async def test_a_server_error_response_discards_the_events(dispatcher: EventDispatcher, gated: GatedTransport):
    """A 5xx response without an exception also counts as failed."""
    gated.gate.set()
    transport = httpx.ASGITransport(make_app(dispatcher))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/unavailable")
    assert response.status_code == 503
    assert not gated.started.is_set()


@pytest.mark.parametrize(("discard_status", "published"), [(500, 1), (400, 0)])
async def test_an_http_exception_counts_as_the_response_it_becomes(
    dispatcher: EventDispatcher, gated: GatedTransport, discard_status: int, published: int
):
    """Starlette turns HTTPException(409) into a 409 response: by default (discard_status=500) a 4xx keeps the
    events; discard_status=400 discards them.
    """
    gated.gate.set()
    transport = httpx.ASGITransport(make_app(dispatcher, discard_status=discard_status))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/conflict")
    assert response.status_code == 409
    assert len(gated.messages) == published


async def test_a_background_task_that_fails_after_a_successful_response_keeps_the_events(
    dispatcher: EventDispatcher, gated: GatedTransport
):
    """The client got its 200; a background task raising afterwards did not make the request fail, so its
    events are published (they used to be discarded).
    """
    gated.gate.set()
    transport = httpx.ASGITransport(make_app(dispatcher), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/background")
    assert response.status_code == 200
    assert len(gated.messages) == 1


async def test_discard_on_error_false_publishes_even_after_a_crash(
    dispatcher: EventDispatcher, gated: GatedTransport
):
    """With discard_on_error=False the events of a failed request are published anyway."""
    gated.gate.set()
    transport = httpx.ASGITransport(make_app(dispatcher, discard_on_error=False), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/crash")
    assert response.status_code == 500
    assert len(gated.messages) == 1


async def test_a_failed_publish_after_the_response_is_logged_and_reported(
    dispatcher: EventDispatcher, gated: GatedTransport, caplog: pytest.LogCaptureFixture
):
    """The client already has its 200; the failure goes to the log with message ids and to the callback."""
    gated.gate.set()
    gated.fail_with = PublishError("broker down")
    failures: list[tuple[Exception, int]] = []
    app = make_app(dispatcher, on_publish_error=lambda exc, messages: failures.append((exc, len(messages))))
    with caplog.at_level(logging.ERROR, logger="queueable.asgi"):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            response = await client.post("/comment/1")
    assert response.status_code == 200
    assert [(str(exc), n) for exc, n in failures] == [("broker down", 2)]
    assert "message ids" in caplog.text


async def test_a_publish_cancelled_after_the_response_is_logged_and_reported(
    dispatcher: EventDispatcher, gated: GatedTransport, caplog: pytest.LogCaptureFixture
):
    """A server's shutdown timeout can cancel the post-response publish: the messages are named in the log and
    passed to the callback (as a PublishError), and the cancellation still propagates.
    """
    failures: list[tuple[Exception, int]] = []
    app = make_app(dispatcher, on_publish_error=lambda exc, messages: failures.append((exc, len(messages))))
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/comment/1", "headers": [], "query_string": b""}
    with caplog.at_level(logging.ERROR, logger="queueable.asgi"):
        request = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(gated.started.wait(), 5)  # the response is out, the publish is waiting
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    assert any(m.get("type") == "http.response.body" for m in sent)
    assert gated.batches == []
    [(error, count)] = failures
    assert isinstance(error, PublishError)
    assert count == 2
    assert len(error.message_ids) == 2
    assert "may not have been published" in caplog.text
    assert error.message_ids[0] in caplog.text


async def post_a_bad_and_a_good_event(
    provider: ListenerProvider, gated: RecordingTransport, on_publish_error: Callable[..., object]
) -> int:
    """One request dispatching an event its model rejects, then a good one; the response status."""
    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    provider.add_listener(lambda e: None, Broken, queue=True, id="broken")
    dispatcher = EventDispatcher(provider, gated)
    if isinstance(gated, GatedTransport):
        gated.gate.set()

    async def handler(request: Request) -> JSONResponse:
        await dispatcher.dispatch(Broken(value=1))
        await dispatcher.dispatch(CommentPosted(post_id=1, author="ann", text="hi"))
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/", handler, methods=["POST"])],
        middleware=[
            Middleware(DeferredDispatchMiddleware, dispatcher=dispatcher, on_publish_error=on_publish_error)
        ],
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        response = await client.post("/")
    return response.status_code


async def test_a_cancelled_publish_still_reports_the_refused_messages(
    provider: ListenerProvider, caplog: pytest.LogCaptureFixture
):
    """Cancelled while publishing the good messages, the middleware still reports the ones it refused."""

    class Cancelling(RecordingTransport):
        async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
            raise asyncio.CancelledError

    reports: list[str] = []
    with caplog.at_level(logging.ERROR, logger="queueable.asgi"), pytest.raises(asyncio.CancelledError):
        await post_a_bad_and_a_good_event(
            provider, Cancelling(), lambda exc, messages: reports.append(type(exc).__name__)
        )
    assert sorted(reports) == ["PublishError", "SerializationError"]
    assert "Broken serialized to JSON that its own model rejects" in caplog.text


async def test_an_event_its_model_rejects_is_refused_after_the_response_and_reported(
    provider: ListenerProvider, gated: GatedTransport, caplog: pytest.LogCaptureFixture
):
    """Validation runs after the response: the bad message is logged and reported, the request's others go."""
    failures: list[tuple[Exception, list[str]]] = []
    with caplog.at_level(logging.ERROR, logger="queueable.asgi"):
        status = await post_a_bad_and_a_good_event(
            provider,
            gated,
            lambda exc, messages: failures.append((exc, [m.headers["x-queueable-listener"] for m in messages])),
        )
    assert status == 200
    assert [m.headers["x-queueable-listener"] for m in gated.messages] == ["mailer:notify_author"]
    assert [(type(exc), ids) for exc, ids in failures] == [(SerializationError, ["broken"])]
    assert "its own model rejects" in caplog.text


async def test_concurrent_requests_publish_only_their_own_events(
    dispatcher: EventDispatcher, gated: GatedTransport
):
    """Each request flushes its own buffer: two requests, two batches of two."""
    gated.gate.set()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(make_app(dispatcher)), base_url="http://test"
    ) as client:
        await asyncio.gather(client.post("/comment/10"), client.post("/comment/20"))
    assert sorted(sorted(CommentPosted.model_validate_json(m.body).post_id for m in b) for b in gated.batches) == [
        [10, 11],
        [20, 21],
    ]


async def test_non_http_scopes_pass_through(dispatcher: EventDispatcher):
    """Lifespan and websocket scopes are not wrapped in a deferral scope."""
    seen: list[str] = []

    async def inner(scope, receive, send) -> None:
        seen.append(scope["type"])

    middleware = DeferredDispatchMiddleware(inner, dispatcher)
    await middleware({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]


async def test_a_raising_on_publish_error_is_logged_and_the_good_messages_still_go(
    provider: ListenerProvider, gated: GatedTransport, caplog: pytest.LogCaptureFixture
):
    """The callback runs after the publish, and an exception in it never escapes the middleware."""

    def callback(exc: Exception, messages: Sequence[OutgoingMessage]) -> None:
        msg = "callback bug"
        raise RuntimeError(msg)

    with caplog.at_level(logging.ERROR, logger="queueable.asgi"):
        assert await post_a_bad_and_a_good_event(provider, gated, callback) == 200
    assert [m.headers["x-queueable-listener"] for m in gated.messages] == ["mailer:notify_author"]
    assert "on_publish_error raised" in caplog.text
