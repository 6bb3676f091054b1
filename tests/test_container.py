"""The built-in Container and the svcs adapter."""

from __future__ import annotations

import threading
import time

import pytest
import svcs

from queueable import App, Container, Settings, SvcsContainer, UnknownServiceError
from queueable.abc import Container as ContainerProtocol
from queueable.testing import TestTransport
from tests.fakes import CommentPosted, Mailer, Recorder


def test_services_are_lazy_singletons_by_default():
    """The factory runs on first get() only, and every get() returns the same instance."""
    built = []
    container = Container()
    container.register("mailer", lambda: built.append(1) or Mailer())
    assert built == []
    assert container.get("mailer") is container.get("mailer")
    assert built == [1]


def test_non_singletons_are_built_each_time():
    """singleton=False builds a fresh service on every get()."""
    container = Container()
    container.register("mailer", Mailer, singleton=False)
    assert container.get("mailer") is not container.get("mailer")


def test_unknown_id_is_a_lookup_error_that_lists_known_ids():
    """An unknown id raises UnknownServiceError (a LookupError) naming the ids that exist."""
    container = Container()
    container.register("mailer", Mailer)
    with pytest.raises(LookupError, match=r"no service registered with id 'mailr' \(known: mailer\)") as info:
        container.get("mailr")
    assert isinstance(info.value, UnknownServiceError)
    assert info.value.service_id == "mailr"


def test_type_is_known_for_class_factories_and_instances():
    """type_of() answers without building: classes and instances yes, lambdas no."""
    container = Container()
    container.register("cls", Mailer)
    container.register_instance("inst", Recorder())
    container.register("fn", lambda: Mailer())  # noqa: PLW0108 - a lambda hides the type
    assert container.type_of("cls") is Mailer
    assert container.type_of("inst") is Recorder
    assert container.type_of("fn") is None
    assert container.type_of("missing") is None


def test_singleton_is_built_once_under_concurrent_threads():
    """Sync listeners in worker threads racing for a singleton get one instance."""
    builds = []

    def slow_factory() -> Mailer:
        builds.append(1)
        time.sleep(0.01)
        return Mailer()

    container = Container()
    container.register("mailer", slow_factory)
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(container.get("mailer"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert len({id(r) for r in results}) == 1


def test_containers_satisfy_the_protocol():
    """Both containers are structurally queueable.abc.Container."""
    assert isinstance(Container(), ContainerProtocol)
    assert isinstance(SvcsContainer(svcs.Registry(), {}), ContainerProtocol)


async def test_svcs_container_resolves_queued_listeners_by_explicit_mapping():
    """svcs looks services up by type; the adapter maps stable string ids to types and nothing else."""
    recorder = Recorder()
    registry = svcs.Registry()
    registry.register_factory(Mailer, lambda: Mailer(recorder))
    container = SvcsContainer(registry, {"mailer": Mailer})
    app = App(container=container, settings=Settings(url="memory://"))
    app.add_listener_service("mailer", "notify_author", queue=True)  # type known from the mapping

    async with TestTransport(app) as transport:
        await app.dispatch(CommentPosted(post_id=1, author="a", text="t"))
        await transport.run_until_idle()
    assert recorder.names == ["notify_author"]
    with pytest.raises(UnknownServiceError):
        container.get("Mailer")
    await container.aclose()
