"""Integration fixtures: a real RabbitMQ, never a mock.

The broker is ``QUEUEABLE_TEST_URL`` if set, else the local ``amqp://guest:guest@127.0.0.1:5672/``, else a
testcontainers RabbitMQ when a Docker engine answers. If none is reachable the run *fails* (it never skips):
these tests are the proof that nothing is lost on a real broker.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aio_pika
import pytest

from _consumer_process import World
from _rabbit_node import RabbitNode
from _rabbit_node import available as rabbit_node_available

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

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


# -- process-level tests: the real `queueable-consume` on a test's own queue (see _consumer_process.py) --------


@pytest.fixture(name="world")
async def fixture_world(amqp_url: str, unique: str, tmp_path: Path) -> AsyncIterator[World]:
    """A unique work queue and exchange on the shared broker, with consumers that are reaped at teardown."""
    world = World(url=amqp_url, queue=unique, exchange=unique + ".x", tmp=tmp_path)
    try:
        yield world
    finally:
        world.reap()
        await world.close_apps()
        await world.delete_topology()


@pytest.fixture(scope="session", name="rabbit_node")
def fixture_rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A private RabbitMQ node on its own ports and data dir, which tests may restart or kill."""
    if not rabbit_node_available():
        pytest.fail("broker-restart tests need a RabbitMQ installation in /usr/lib/rabbitmq", pytrace=False)
    node = RabbitNode(tmp_path_factory.mktemp("rabbit"))
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(name="private_world")
async def fixture_private_world(rabbit_node: RabbitNode, unique: str, tmp_path: Path) -> AsyncIterator[World]:
    """Like ``world``, on the private node; the node is running again when the test ends."""
    world = World(url=rabbit_node.url, queue=unique, exchange=unique + ".x", tmp=tmp_path)
    try:
        yield world
    finally:
        world.reap()
        await world.close_apps()
        if not rabbit_node.running:
            rabbit_node.start()
        await world.delete_topology()


#: What the in-process transport and worker tests may create under their ``unique`` name.
_ADMIN_SUFFIXES = ("", ".dead", ".other", ".other.dead", *(f".delay.{ms}" for ms in (200, 320, 400, 500, 640)))


@pytest.fixture(name="admin")
async def fixture_admin(amqp_url: str, unique: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A plain connection for publishing raw messages and reading queues; deletes this test's queues and
    exchange afterwards.
    """
    connection = await aio_pika.connect(amqp_url)
    yield connection
    channel = await connection.channel()
    for suffix in _ADMIN_SUFFIXES:
        try:
            await channel.queue_delete(unique + suffix)
        except aio_pika.exceptions.AMQPError:
            channel = await connection.channel()
    with contextlib.suppress(aio_pika.exceptions.AMQPError):
        await channel.exchange_delete(unique)
    await connection.close()
