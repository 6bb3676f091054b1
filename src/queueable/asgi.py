"""``DeferredDispatchMiddleware``: publish a request's events only after its response has been sent.

Symfony's delayed dispatcher on ``kernel.terminate``, for any ASGI framework (Starlette, FastAPI, Litestar,
Quart, Django's ASGI handler)::

    app = Starlette(routes=..., middleware=[Middleware(DeferredDispatchMiddleware, dispatcher=events_app)])

Each HTTP request runs inside :meth:`EventDispatcher.deferred`: events its handler dispatches are serialized
at once (an event that cannot become JSON raises in the handler), then validated back and published, all
together and confirmed, after the last byte of the response has been handed to the server. The client never
waits for the broker, nor for the validation. A request whose handler raises, or whose response is a server
error (``>= 500``), or that never completed its response, publishes nothing (``discard_on_error=False``
publishes anyway).

What fails after the response cannot reach the client any more: a publish the broker did not confirm
(``PublishError``), or an event whose JSON its own model rejects (``SerializationError``; that message is
never sent, the request's other messages are). Either is logged at ERROR with the message ids and passed to
``on_publish_error(exc, messages)`` if given. Use the transactional outbox when an event must not be lost.

No runtime dependency: this is plain ASGI.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from queueable._app import App
from queueable._dispatcher import EventDispatcher, close_scope, open_scope
from queueable.errors import PublishError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping, Sequence

    from queueable._wire import OutgoingMessage
    from queueable.errors import SerializationError

    Message = MutableMapping[str, Any]
    Scope = MutableMapping[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["DeferredDispatchMiddleware"]

log = logging.getLogger("queueable.asgi")

_COMPLETE = frozenset({"http.response.pathsend", "http.response.zerocopysend"})


class DeferredDispatchMiddleware:
    """Open a deferral scope per HTTP request; flush it after the response is sent.

    ``dispatcher`` is the :class:`~queueable.App` (its current dispatcher is used on each request) or an
    :class:`~queueable.EventDispatcher`. ``discard_status``: responses with this status or higher count as
    failed (default 500). ``on_publish_error(exc, messages)`` is called when the post-response publish fails
    (``PublishError``) and for messages refused at the flush because their JSON fails validation
    (``SerializationError``); an exception it raises is logged, never propagated.
    """

    def __init__(
        self,
        app: ASGIApp,
        dispatcher: App | EventDispatcher,
        *,
        discard_on_error: bool = True,
        discard_status: int = 500,
        on_publish_error: Callable[[Exception, Sequence[OutgoingMessage]], Any] | None = None,
    ) -> None:
        self.app = app
        self.dispatcher = dispatcher
        self.discard_on_error = discard_on_error
        self.discard_status = discard_status
        self.on_publish_error = on_publish_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        dispatcher = self.dispatcher.dispatcher if isinstance(self.dispatcher, App) else self.dispatcher
        status = 0
        complete = False

        async def tracking_send(message: Message) -> None:
            nonlocal status, complete
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
            elif (kind == "http.response.body" and not message.get("more_body", False)) or kind in _COMPLETE:
                await send(message)
                complete = True
                return
            await send(message)

        buffer, token = open_scope(dispatcher)
        try:
            await self.app(scope, receive, tracking_send)
        except BaseException:
            # After a complete, successful response the exception is a background task's (Starlette runs them
            # after the last byte): the request itself succeeded, and its events stand.
            succeeded = complete and status < self.discard_status
            keep = succeeded or not self.discard_on_error
            await self._publish(dispatcher, *close_scope(buffer, token, keep=keep))
            raise
        failed = not complete or status >= self.discard_status
        keep = not (failed and self.discard_on_error)
        await self._publish(dispatcher, *close_scope(buffer, token, keep=keep))
        if not keep:
            log.debug("request failed (status %s); its events were discarded", status)

    async def _publish(
        self,
        dispatcher: EventDispatcher,
        messages: list[OutgoingMessage],
        rejected: SerializationError | None,
    ) -> None:
        """Publish ``messages``, then report the refused ones; nothing here raises (the response is gone), but a
        cancellation, after its report.
        """
        try:
            await self._publish_messages(dispatcher, messages)
        finally:
            if rejected is not None:
                log.error("%s", rejected)
                self._report(rejected, rejected.messages)

    async def _publish_messages(self, dispatcher: EventDispatcher, messages: list[OutgoingMessage]) -> None:
        if messages:
            transport = dispatcher.transport
            assert transport is not None  # checked when the messages were buffered
            try:
                await transport.publish(messages)
            except Exception as exc:
                log.exception(
                    "publishing %d event message(s) after the response failed; message ids: %s",
                    len(messages),
                    ", ".join(m.message_id for m in messages),
                )
                self._report(exc, messages)
            except BaseException as exc:  # cancelled (a server's shutdown timeout): say what may be lost, go on
                log.error(  # noqa: TRY400 - a cancellation's traceback says nothing
                    "publishing %d event message(s) after the response was cancelled (%s); they may not have been "
                    "published; message ids: %s",
                    len(messages),
                    type(exc).__name__,
                    ", ".join(m.message_id for m in messages),
                )
                cancelled = PublishError(
                    f"cancelled ({type(exc).__name__}) before the broker confirmed: the messages may or may not "
                    "have been published",
                    message_ids=[m.message_id for m in messages],
                )
                self._report(cancelled, messages)
                raise

    def _report(self, exc: Exception, messages: Sequence[OutgoingMessage]) -> None:
        if self.on_publish_error is None:
            return
        try:
            self.on_publish_error(exc, messages)
        except Exception:
            log.exception("on_publish_error raised")

    def __repr__(self) -> str:
        return f"<DeferredDispatchMiddleware app={self.app!r} discard_on_error={self.discard_on_error}>"
