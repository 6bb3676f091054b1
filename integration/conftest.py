"""Integration fixtures: a real RabbitMQ, never a mock.

The broker is ``QUEUEABLE_TEST_URL`` if set, else the local ``amqp://guest:guest@127.0.0.1:5672/``, else a
testcontainers RabbitMQ when a Docker engine answers. If none is reachable the run *fails* (it never skips):
these tests are the proof that nothing is lost on a real broker.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _reachable(url: str, timeout: float = 2.0) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=timeout):
            return True
    except OSError:
        return False


def _docker_broker() -> Iterator[str] | None:
    try:
        import docker  # noqa: PLC0415
        from testcontainers.rabbitmq import RabbitMqContainer  # noqa: PLC0415

        docker.from_env().ping()
    except Exception:
        return None

    def run() -> Iterator[str]:
        with RabbitMqContainer("rabbitmq:3.13-management") as container:
            params = container.get_connection_params()
            yield f"amqp://guest:guest@{params.host}:{params.port}/"

    return run()


@pytest.fixture(scope="session", name="amqp_url")
def fixture_amqp_url() -> Iterator[str]:
    """The URL of a reachable RabbitMQ; fails the session when there is none."""
    explicit = os.environ.get("QUEUEABLE_TEST_URL")
    if explicit:
        if not _reachable(explicit):
            pytest.fail("QUEUEABLE_TEST_URL is set but the broker does not answer", pytrace=False)
        yield explicit
        return
    if _reachable(LOCAL_URL):
        yield LOCAL_URL
        return
    containers = _docker_broker()
    if containers is None:
        pytest.fail(
            "no RabbitMQ reachable: set QUEUEABLE_TEST_URL, start one on 127.0.0.1:5672 "
            "(rabbitmq-server -detached), or run a Docker engine for testcontainers",
            pytrace=False,
        )
    yield from containers


@pytest.fixture(name="unique")
def fixture_unique(request: pytest.FixtureRequest) -> str:
    """A name prefix unique to this test, for queues and exchanges (``qtest.<test>.<hex>``)."""
    name = request.node.name.replace("[", ".").replace("]", "")[:40]
    return f"qtest.{name}.{uuid.uuid4().hex[:8]}"
