"""``App``: container + provider + settings in one object, importable by the CLI as ``module:attribute``."""

from __future__ import annotations

import importlib
import logging
import sys
import sysconfig
import threading
import traceback
from typing import TYPE_CHECKING, Any, TypeVar

from queueable._consumer import Processor
from queueable._container import Container
from queueable._dispatcher import EventDispatcher
from queueable._provider import ListenerProvider
from queueable._settings import Settings, mask_url
from queueable.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from queueable._retry import RetryPolicy
    from queueable.abc import Container as ContainerProtocol
    from queueable.abc import Transport

__all__ = ["App", "load_app"]

log = logging.getLogger("queueable")

E = TypeVar("E")
C = TypeVar("C", bound=type[Any])


class App:
    """Everything a producer and a worker share: the container, the listener provider and the settings.

    ::

        app = App()                                # QUEUEABLE_URL from the environment

        @app.service("mailer")
        class Mailer:
            @listener(queue=True)
            async def notify_author(self, event: CommentPosted) -> None: ...

        await app.dispatch(CommentPosted(...))     # or app.dispatcher.dispatch(...)

    ``queueable-consume myapp:app`` imports the same object in the worker, so the worker knows exactly the
    listeners the producer registered and nothing else.
    """

    def __init__(
        self,
        *,
        container: ContainerProtocol | None = None,
        provider: ListenerProvider | None = None,
        settings: Settings | None = None,
        url: str | None = None,
        default_retry: RetryPolicy | None = None,
    ) -> None:
        settings = settings or Settings.from_env()
        if url is not None:
            settings = settings.merged(url=url)
        self.settings = settings
        self.container: ContainerProtocol = container if container is not None else Container()
        self.provider = provider or ListenerProvider(
            self.container, default_queue=settings.default_queue, default_retry=default_retry
        )
        self._transport: Transport | None = None
        # The transport and dispatcher are made on first use, which threads can reach at once (a SyncDispatcher
        # serving a threaded server): one lock, so that no second transport (and connection) is made and lost.
        self._making = threading.Lock()
        self._dispatcher: EventDispatcher | None = None
        self.provider.watch_queues(self._on_new_queue)

    # -- registration shortcuts --------------------------------------------------------------------

    def service(self, service_id: str) -> Callable[[C], C]:
        """Class decorator: see :meth:`ListenerProvider.service`."""
        return self.provider.service(service_id)

    @property
    def listen(self) -> Any:
        """Decorator for plain listeners: see :meth:`ListenerProvider.listen`."""
        return self.provider.listen

    @property
    def add_listener(self) -> Any:
        """See :meth:`ListenerProvider.add_listener`."""
        return self.provider.add_listener

    @property
    def add_listener_service(self) -> Any:
        """See :meth:`ListenerProvider.add_listener_service`."""
        return self.provider.add_listener_service

    # -- runtime -----------------------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        """The transport for queued listeners, created from ``settings.url`` on first use."""
        if self._transport is None:
            with self._making:
                if self._transport is None:
                    self._transport = self._make_transport()
        return self._transport

    def use_transport(self, transport: Transport) -> None:
        """Replace the transport (``queueable.testing`` does this); binds in-memory transports to this app."""
        from queueable.transport.memory import MemoryTransport  # noqa: PLC0415

        if isinstance(transport, MemoryTransport):
            transport.bind(self.processor())
        self._transport = transport
        self._dispatcher = None

    @property
    def dispatcher(self) -> EventDispatcher:
        """The app's :class:`EventDispatcher`."""
        dispatcher = self._dispatcher
        if dispatcher is None:
            transport = self.transport
            with self._making:
                if self._dispatcher is None:
                    self._dispatcher = EventDispatcher(self.provider, transport, container=self.container)
                dispatcher = self._dispatcher
        return dispatcher

    async def dispatch(self, event: E, *, defer: bool = False) -> E:
        """Shortcut for ``app.dispatcher.dispatch(event, defer=defer)``."""
        return await self.dispatcher.dispatch(event, defer=defer)

    def processor(self, **options: Any) -> Processor:
        """The decision function the consumer runs, bound to this app's provider and container."""
        options.setdefault("max_body_size", self.settings.max_body_size)
        return Processor(self.provider, self.container, **options)

    def _make_transport(self) -> Transport:
        settings = self.settings
        if settings.url is None:
            if settings.require_broker:
                msg = "QUEUEABLE_URL is not set and a broker is required (QUEUEABLE_REQUIRE_BROKER)"
                raise ConfigurationError(msg)
            log.warning(
                "QUEUEABLE_URL is not set: queued listeners run in this process after dispatch "
                "(memory://); nothing survives a restart. Set QUEUEABLE_URL=amqp://... in production."
            )
        if settings.scheme == "memory":
            from queueable.transport.memory import MemoryTransport  # noqa: PLC0415

            return MemoryTransport(self.processor(), autorun=True)
        try:
            from queueable.transport.rabbitmq import RabbitMQTransport  # noqa: PLC0415
        except ImportError as exc:  # pragma: no cover - aio-pika is a hard dependency
            msg = f"cannot use {mask_url(settings.url)}: {exc}"
            raise ConfigurationError(msg) from exc
        return RabbitMQTransport(settings, queues=self.provider.queue_names)

    def _on_new_queue(self, name: str) -> None:
        """A listener with a new queue_name was registered: the current transport declares it before use."""
        add_queue = getattr(self._transport, "add_queue", None)
        if add_queue is not None:
            add_queue(name)

    async def close(self) -> None:
        """Close the transport (in embedded mode, after queued listeners finished)."""
        if self._transport is not None:
            await self._transport.close()

    async def __aenter__(self) -> App:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<App url={mask_url(self.settings.url)} provider={self.provider!r}>"


def load_app(spec: str) -> App:
    """Import ``module:attribute`` (or ``module`` with an ``app`` attribute) and return the App it names.

    The attribute may also be a zero-argument factory returning an App. The current directory is importable,
    as with ``uvicorn`` and ``celery -A``.
    """
    module_name, _, attribute = spec.partition(":")
    attribute = attribute or "app"
    if not module_name:
        msg = f"expected module:attribute, got {spec!r}"
        raise ConfigurationError(msg)
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"cannot import {module_name!r}: {exc}"
        raise ConfigurationError(msg) from exc
    except Exception as exc:  # the app's own code failed (a SyntaxError, a missing setting): where and why
        msg = f"importing {module_name!r} failed: {_raised(exc)}"
        raise ConfigurationError(msg) from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            msg = f"module {module_name!r} has no attribute {attribute!r}"
            raise ConfigurationError(msg) from None
    if not isinstance(target, App) and callable(target):
        try:
            target = target()
        except Exception as exc:
            msg = f"{spec}() failed: {_raised(exc)}"
            raise ConfigurationError(msg) from exc
    if not isinstance(target, App):
        msg = f"{spec} is {type(target).__qualname__}, not a queueable.App"
        raise ConfigurationError(msg)
    return target


def _raised(exc: Exception) -> str:
    """``exc`` on one line, with the file and line it came from (a SyntaxError says them itself)."""
    text = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames and not isinstance(exc, SyntaxError):
        # The deepest frame of the app's own code, not of the standard library it called (os.environ[...]).
        stdlib = sysconfig.get_paths()["stdlib"]
        own = [f for f in frames if not f.filename.startswith(("<", stdlib))] or frames
        text += f" (at {own[-1].filename}:{own[-1].lineno})"
    return text
