"""What the benchmark's parts share: the events, the queue names of a run, raw aio-pika helpers, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass

import aio_pika
from pydantic import BaseModel

from queueable import event

#: Listener ids; the memory worker (``mem_app.py``) registers the same id as the producer.
MEM_LISTENER = "bench:mem"
CONSUME_LISTENER = "bench:consume"


class Line(BaseModel):
    sku: str
    quantity: int
    unit_price_cents: int


class Order(BaseModel):
    order_id: int
    customer_id: str
    email: str
    lines: list[Line]
    total_cents: int
    currency: str
    placed_at: str
    note: str


@event("bench.order_placed")
class OrderPlaced(Order):
    """One queued listener."""


@event("bench.order_shipped")
class OrderShipped(Order):
    """Three queued listeners."""


@event("bench.order_spread")
class OrderSpread(Order):
    """Three queued listeners, each on a queue of its own (``fanout_detail``)."""


@event("bench.order_consumed")
class OrderConsumed(Order):
    """The consumer benchmark's event."""


@event("bench.order_mem")
class OrderMem(Order):
    """The memory benchmark's event."""


def order(cls: type[Order], n: int) -> Order:
    """An event whose JSON is about 300 bytes."""
    return cls(
        order_id=n,
        customer_id=f"cus_{n:012d}",
        email=f"customer{n % 9973}@example.com",
        lines=[
            Line(sku="SKU-000123-BLUE-M", quantity=2, unit_price_cents=1999),
            Line(sku="SKU-004567-RED-XL", quantity=1, unit_price_cents=4599),
        ],
        total_cents=8597,
        currency="EUR",
        placed_at="2026-11-29T12:00:00.000+00:00",
        note="leave at the door, ring twice; gift wrap",
    )


@dataclass(frozen=True, slots=True)
class Names:
    """The exchange and queues of one benchmark run (unique per run; all deleted at the end)."""

    prefix: str

    @classmethod
    def fresh(cls) -> Names:
        return cls(f"bench.{uuid.uuid4().hex[:10]}")

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.x"

    @property
    def publish(self) -> str:
        """queueable's dispatch benchmarks publish here."""
        return f"{self.prefix}.publish"

    @property
    def raw_publish(self) -> str:
        """raw aio-pika's publish benchmarks publish here."""
        return f"{self.prefix}.raw"

    @property
    def consume(self) -> str:
        return f"{self.prefix}.consume"

    @property
    def raw_consume(self) -> str:
        return f"{self.prefix}.rawconsume"

    @property
    def memory(self) -> str:
        return f"{self.prefix}.mem"

    def spread(self) -> list[str]:
        """Three queues of their own for three listeners (``fanout_detail``)."""
        return [f"{self.prefix}.spread{i}" for i in range(3)]

    def queues(self) -> list[str]:
        work = [self.publish, self.raw_publish, self.consume, self.raw_consume, self.memory, *self.spread()]
        return [*work, *(f"{name}.dead" for name in work)]


async def cleanup(url: str, names: Names) -> None:
    """Delete every queue and the exchange of this run (missing ones are fine)."""
    connection = await aio_pika.connect(url)
    try:
        for queue in names.queues():
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
            with contextlib.suppress(Exception):
                await channel.close()
        channel = await connection.channel()
        with contextlib.suppress(Exception):
            await channel.exchange_delete(names.exchange)
    finally:
        await connection.close()


async def purge(channel: aio_pika.abc.AbstractChannel, *queues: str) -> None:
    """Empty ``queues`` between scenarios so that queue length does not drift across rounds."""
    for name in queues:
        queue = await channel.get_queue(name, ensure=False)
        await queue.purge()


async def publish_window(
    exchange: aio_pika.abc.AbstractExchange,
    routing_key: str,
    messages: list[aio_pika.Message],
    window: int = 500,
) -> None:
    """Publish ``messages`` confirmed, ``window`` at a time (used to pre-fill queues; not timed)."""
    for start in range(0, len(messages), window):
        chunk = messages[start : start + window]
        await asyncio.gather(*(exchange.publish(m, routing_key, mandatory=True) for m in chunk))
