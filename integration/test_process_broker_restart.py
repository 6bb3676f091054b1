"""Broker restarts on a PRIVATE node (never the shared one): nothing that a dispatch confirmed is lost."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aio_pika
import pytest

if TYPE_CHECKING:
    from _rabbit_node import RabbitNode

pytestmark = pytest.mark.slow


async def test_private_node_keeps_durable_messages_across_a_restart(rabbit_node: RabbitNode, unique: str) -> None:
    """A persistent message in a durable quorum queue of the private node survives ``restart()``."""
    connection = await aio_pika.connect(rabbit_node.url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.declare_queue(unique, durable=True, arguments={"x-queue-type": "quorum"})
    await channel.default_exchange.publish(
        aio_pika.Message(b"kept", delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=unique
    )
    await connection.close()

    rabbit_node.restart()

    connection = await aio_pika.connect(rabbit_node.url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(unique, passive=True)
        message = await queue.get(no_ack=True, fail=False, timeout=10)
        assert message is not None
        assert message.body == b"kept"
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
