"""The built-in service container and the adapter for svcs."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from queueable.errors import ConfigurationError, UnknownServiceError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["Container", "SvcsContainer"]

_UNSET: Any = object()


class _Entry:
    __slots__ = ("factory", "instance", "lock", "singleton")

    def __init__(self, factory: Callable[[], object], *, singleton: bool) -> None:
        self.factory = factory
        self.singleton = singleton
        self.instance: object = _UNSET
        self.lock = threading.Lock()


class Container:
    """A small service container: lazy factories, singletons by default, a clear error for unknown ids.

    >>> container = Container()
    >>> container.register("mailer", Mailer)            # built on first get(), then shared
    >>> container.register("clock", time.time, singleton=False)
    >>> container.register_instance("settings", settings)

    Registering a class (not an instance) as factory also tells queueable the service's type, so that listener
    methods are checked at registration without building the service.
    Thread-safe: a singleton is built once even when a sync listener in a worker thread asks for it first.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(self, service_id: str, factory: Callable[[], object], *, singleton: bool = True) -> None:
        """Register ``factory`` (a class or any zero-argument callable) under ``service_id``."""
        if not service_id:
            raise ConfigurationError("service_id must be a non-empty string")
        if not callable(factory):
            msg = f"factory for {service_id!r} must be callable, got {factory!r}"
            raise ConfigurationError(msg)
        self._entries[service_id] = _Entry(factory, singleton=singleton)

    def register_instance(self, service_id: str, instance: object) -> None:
        """Register an already-built ``instance`` under ``service_id``."""
        entry = _Entry(lambda: instance, singleton=True)
        entry.instance = instance
        self._entries[service_id] = entry

    def get(self, service_id: str) -> object:
        """Return the service registered under ``service_id``, building it on first use."""
        try:
            entry = self._entries[service_id]
        except KeyError:
            raise UnknownServiceError(service_id, list(self._entries)) from None
        if not entry.singleton:
            return entry.factory()
        if entry.instance is _UNSET:
            with entry.lock:
                if entry.instance is _UNSET:
                    entry.instance = entry.factory()
        return entry.instance

    def has(self, service_id: str) -> bool:
        """Whether ``service_id`` is registered."""
        return service_id in self._entries

    def type_of(self, service_id: str) -> type | None:
        """The service's class when it is known without building it (a class factory or an instance)."""
        entry = self._entries.get(service_id)
        if entry is None:
            return None
        if entry.instance is not _UNSET:
            return type(entry.instance)
        return entry.factory if isinstance(entry.factory, type) else None

    def __repr__(self) -> str:
        return f"<Container services={len(self._entries)}>"


class SvcsContainer:
    """Adapts an `svcs <https://svcs.hynek.me>`_ registry to queueable's string-id ``Container`` protocol.

    svcs looks services up by type; queueable's wire format names them by a stable string. The mapping between
    the two is explicit, so no name taken from a message can reach an arbitrary type::

        registry = svcs.Registry()
        registry.register_factory(Mailer, make_mailer)
        container = SvcsContainer(registry, {"mailer": Mailer})

    Each ``get()`` uses a fresh ``svcs.Container`` that lives as long as the adapter (close it with
    ``close()`` / ``aclose()`` to run svcs cleanups).
    """

    def __init__(self, registry: Any, services: Mapping[str, type]) -> None:
        try:
            import svcs  # noqa: PLC0415 - optional dependency
        except ImportError as exc:  # pragma: no cover - exercised only without the extra
            msg = "SvcsContainer needs svcs: pip install 'queueable[svcs]'"
            raise ImportError(msg) from exc
        self._services = dict(services)
        self._container = svcs.Container(registry)

    def get(self, service_id: str) -> object:
        """Return the svcs service mapped to ``service_id``."""
        try:
            svc_type = self._services[service_id]
        except KeyError:
            raise UnknownServiceError(service_id, list(self._services)) from None
        return self._container.get(svc_type)

    def has(self, service_id: str) -> bool:
        """Whether ``service_id`` is mapped to a type."""
        return service_id in self._services

    def type_of(self, service_id: str) -> type | None:
        """The type ``service_id`` is mapped to."""
        return self._services.get(service_id)

    def close(self) -> None:
        """Run the svcs container's cleanups."""
        self._container.close()

    async def aclose(self) -> None:
        """Run the svcs container's cleanups, async ones included."""
        await self._container.aclose()

    def __repr__(self) -> str:
        return f"<SvcsContainer services={len(self._services)}>"
