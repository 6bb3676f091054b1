"""Fixtures for the unit tests (no broker)."""

from __future__ import annotations

import pytest

from queueable import App, Container, ListenerProvider, Settings
from tests.fakes import Mailer, Recorder, RecordingTransport


@pytest.fixture(name="recorder")
def fixture_recorder() -> Recorder:
    return Recorder()


@pytest.fixture(name="container")
def fixture_container(recorder: Recorder) -> Container:
    container = Container()
    container.register("mailer", lambda: Mailer(recorder))
    container.register("typed_mailer", Mailer)
    return container


@pytest.fixture(name="provider")
def fixture_provider(container: Container) -> ListenerProvider:
    return ListenerProvider(container)


@pytest.fixture(name="transport")
def fixture_transport() -> RecordingTransport:
    return RecordingTransport()


@pytest.fixture(name="app")
def fixture_app(container: Container) -> App:
    return App(container=container, settings=Settings(url="memory://"))
