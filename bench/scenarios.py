"""The six benchmarks of issue 6. Each returns table rows; queueable and raw aio-pika run interleaved.

Interleaving, within one process and one event loop: the latency benchmarks alternate the two sides publish by
publish (A B B A A B …, an ABBA ladder) inside every round; the throughput benchmarks, whose rounds take
seconds, alternate whole rounds the same way. Drift (broker compaction, page cache, CPU frequency, the other
tenants of this 2-core machine) thus hits both sides alike and neither always goes first. Every round is one
sample of each figure; a figure is the median over rounds, with the interquartile range as its spread.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
from _common import (
    CONSUME_LISTENER,
    MEM_LISTENER,
    Names,
    Order,
    OrderConsumed,
    OrderMem,
    OrderPlaced,
    OrderShipped,
    OrderSpread,
    order,
    publish_window,
    purge,
)
from _stats import Row, Spread, percentile

from queueable import App, OutgoingMessage, Settings
from queueable._dispatcher import build_messages, encode_event
from queueable._worker import Worker, WorkerOptions
from queueable.cli.consume import DEFAULT_CONCURRENCY
from queueable.transport.rabbitmq import RabbitMQTransport

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from queueable import Listener

BENCH_DIR = Path(__file__).resolve().parent
JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each benchmark does (``--quick`` shrinks everything)."""

    rounds: int = 10  # latency and deferred rounds (each holds both sides)
    latency_samples: int = 300  # sequential publishes per side and round
    throughput_rounds: int = 16  # per side
    throughput_messages: int = 2000  # per round
    in_flight: int = 100  # concurrent publishes
    consume_rounds: int = 6  # per side
    consume_messages: int = 6000  # per round
    deferred_samples: int = 2000  # per round
    memory_messages: int = 100_000
    memory_interval: int = 10_000

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            rounds=4,
            latency_samples=100,
            throughput_rounds=6,
            throughput_messages=1000,
            consume_rounds=2,
            consume_messages=3000,
            deferred_samples=500,
            memory_messages=20_000,
            memory_interval=2000,
        )


@dataclass(slots=True)
class Bench:
    """The connections and apps one run shares; ``rounds`` keeps every round's figures for ``--json``."""

    url: str
    names: Names
    sizes: Sizes
    app: App
    raw_connection: aio_pika.abc.AbstractRobustConnection
    raw_channel: aio_pika.abc.AbstractChannel
    raw_exchange: aio_pika.abc.AbstractExchange
    rounds: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @classmethod
    async def start(cls, url: str, names: Names, sizes: Sizes) -> Bench:
        settings = Settings(url=url, default_queue=names.publish, exchange=names.exchange)
        app = App(settings=settings)
        app.add_listener(_noop, OrderPlaced, queue=True, id="bench:placed")
        for suffix in ("audit", "mail", "search"):
            app.add_listener(_noop, OrderShipped, queue=True, id=f"bench:shipped.{suffix}")
        app.add_listener(_noop, OrderConsumed, queue=True, queue_name=names.consume, id=CONSUME_LISTENER)
        app.add_listener(_noop, OrderMem, queue=True, queue_name=names.memory, id=MEM_LISTENER)
        transport = app.transport
        assert isinstance(transport, RabbitMQTransport)
        await transport.connect()
        # raw aio-pika gets queues of the very same kind and arguments (quorum, durable), on the same exchange.
        await transport.declare_topology([names.raw_publish, names.raw_consume])
        raw_connection = await aio_pika.connect_robust(url)
        raw_channel = await raw_connection.channel(publisher_confirms=True)
        raw_exchange = await raw_channel.get_exchange(names.exchange, ensure=False)
        return cls(url, names, sizes, app, raw_connection, raw_channel, raw_exchange)

    async def close(self) -> None:
        await self.app.close()
        await self.raw_connection.close()

    def server_version(self) -> str:
        underlay = self.raw_connection.transport
        if underlay is None:
            return "?"
        version = underlay.connection.server_properties.get("version", b"?")
        return version.decode() if isinstance(version, bytes) else str(version)

    def keep(self, scenario: str, side: str, value: float) -> None:
        self.rounds.setdefault(scenario, {}).setdefault(side, []).append(value)

    # -- the two ways to publish one event -------------------------------------------------------------

    async def dispatch(self, event: Any) -> None:
        await self.app.dispatch(event)

    async def raw_publish(self, event: Any) -> None:
        """What a careful aio-pika user writes: JSON body, persistent, mandatory, confirmed."""
        message = aio_pika.Message(
            event.model_dump_json().encode(),
            content_type=JSON,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=uuid.uuid4().hex,
        )
        await self.raw_exchange.publish(message, self.names.raw_publish, mandatory=True)

    def listener(self, listener_id: str) -> Listener:
        (entry,) = self.app.provider.queued(listener_id)
        return entry


async def _noop(event: Order) -> None:
    """The listener every benchmark registers: async, does nothing."""


def _ladder(rounds: int) -> list[int]:
    """0/1 for side A/B, ``rounds`` of each, in the order A B B A A B B A …"""
    return [(i + i // 2) % 2 for i in range(2 * rounds)]


Side = tuple[str, "Callable[[Any], Awaitable[None]]", type]
Times = tuple[list[float], list[float]]


async def _latency_round(sides: tuple[Side, Side], samples: int, base: int) -> tuple[Times, Times]:
    """``samples`` sequential publishes per side, alternating A B B A … publish by publish.

    Returns the wall time (µs) of each publish per side, and the CPU time this process spent meanwhile (the
    client's own cost: serializing, framing, parsing the confirm; not the broker's, not other processes').
    """
    events = [[order(cls, base + i) for i in range(samples)] for _, _, cls in sides]
    wall: Times = ([], [])
    cpu: Times = ([], [])
    clock = time.perf_counter_ns
    cpu_clock = time.thread_time_ns
    for index, side in enumerate(_ladder(samples)):
        publish = sides[side][1]
        event = events[side][index // 2]
        start, cpu_start = clock(), cpu_clock()
        await publish(event)
        cpu[side].append((cpu_clock() - cpu_start) / 1e3)
        wall[side].append((clock() - start) / 1e3)
    return wall, cpu


# -- 1 and 3: latency of one dispatch --------------------------------------------------------------------


async def latency(bench: Bench) -> list[Row]:
    """1: dispatch() with one queued listener vs one raw confirmed persistent publish (p50, p99 per round)."""
    return await _latency_pair(
        bench,
        key="latency",
        sides=(("queueable", bench.dispatch, OrderPlaced), ("raw", bench.raw_publish, OrderPlaced)),
        label="dispatch(), 1 queued listener",
        baseline_label="raw publish",
        target=1.05,
    )


async def fan_out(bench: Bench) -> list[Row]:
    """3: dispatch() of an event with 3 queued listeners vs one with 1 (both queueable).

    For scale, the same comparison for raw aio-pika: 3 concurrent confirmed publishes vs 1.
    """
    rows = await _latency_pair(
        bench,
        key="fanout",
        sides=(("3 listeners", bench.dispatch, OrderShipped), ("1 listener", bench.dispatch, OrderPlaced)),
        label="dispatch(), 3 queued listeners",
        baseline_label="1 listener",
        target=1.2,
    )

    async def raw_three(event: Any) -> None:
        await asyncio.gather(bench.raw_publish(event), bench.raw_publish(event), bench.raw_publish(event))

    reference = await _latency_pair(
        bench,
        key="fanout_raw",
        sides=(("3 publishes", raw_three, OrderPlaced), ("1 publish", bench.raw_publish, OrderPlaced)),
        label="raw: 3 concurrent publishes (reference)",
        baseline_label="1 publish",
        target=None,
    )
    return rows + [row for row in reference if not row.key.endswith(".cpu")]


async def _latency_pair(
    bench: Bench,
    *,
    key: str,
    sides: tuple[Side, Side],
    label: str,
    baseline_label: str,
    target: float | None,
) -> list[Row]:
    """Both sides in every round, interleaved publish by publish; p50 and p99 of each round."""
    sizes = bench.sizes
    await _latency_round(sides, 20, 0)  # warm-up: connections, declarations, caches
    figures: dict[str, Times] = {"p50": ([], []), "p99": ([], []), "cpu": ([], [])}
    for index in range(sizes.rounds):
        wall, cpu = await _latency_round(sides, sizes.latency_samples, index * sizes.latency_samples)
        for side, (name, _, _) in enumerate(sides):
            figures["p50"][side].append(percentile(wall[side], 50))
            figures["p99"][side].append(percentile(wall[side], 99))
            figures["cpu"][side].append(percentile(cpu[side], 50))
            for figure, values in figures.items():
                bench.keep(f"{key}.{figure}", name, values[side][-1])
    await purge(bench.raw_channel, bench.names.publish, bench.names.raw_publish)
    p50, p99, cpu = figures["p50"], figures["p99"], figures["cpu"]
    return [
        Row(f"{key}.p50", f"{label}, p50", "µs", Spread.of(p50[0]), Spread.of(p50[1]),
            baseline_label, target, lower_is_better=True),
        Row(f"{key}.p99", f"{label}, p99", "µs", Spread.of(p99[0]), Spread.of(p99[1]),
            baseline_label, None, lower_is_better=True),
        Row(f"{key}.cpu", f"{label}, client CPU, p50", "µs", Spread.of(cpu[0]), Spread.of(cpu[1]),
            baseline_label, None, lower_is_better=True),
    ]  # fmt: skip


async def fanout_detail(bench: Bench) -> list[Row]:
    """Where the cost of more listeners goes; not in the default run (``--only fanout_detail``).

    In every round, all sides in turn, publish by publish (the order rotating), each against its baseline:
    queueable's 3 listeners on 3 queues of their own against 1 listener; raw aio-pika's 3 concurrent confirmed
    publishes on 1 channel and on 3 channels against 1 publish; and queueable's transport publishing a batch of
    3 messages against 1, with the wire format's headers and with none (what the broker's share of the header
    table is). Wall time p50; the ratio per round, median [IQR] over rounds.
    """
    names = bench.names
    for index, queue in enumerate(names.spread()):
        bench.app.add_listener(_noop, OrderSpread, queue=True, queue_name=queue, id=f"bench:spread.{index}")
    extra = [await bench.raw_connection.channel(publisher_confirms=True) for _ in range(2)]
    try:
        sides = await _detail_sides(bench, [bench.raw_channel, *extra])
        p50 = await _rotating_rounds(bench, sides)
    finally:
        for channel in extra:
            await channel.close()
    await purge(bench.raw_channel, names.publish, names.raw_publish, *names.spread())
    pairs = [
        ("3 listeners, 3 queues", "1 listener", "dispatch(), 3 queued listeners on 3 queues"),
        ("raw 3, 1 channel", "raw 1 publish", "raw: 3 concurrent publishes, 1 channel"),
        ("raw 3, 3 channels", "raw 1 publish", "raw: 3 concurrent publishes, 3 channels"),
        ("transport 3, headers", "transport 1, headers", "transport: 3 messages in one batch, wire headers"),
        ("transport 3, no headers", "transport 1, no headers", "transport: 3 messages in one batch, no headers"),
    ]
    return [
        Row(f"fanout_detail.{subject}", f"{label}, p50", "µs", Spread.of(p50[subject]), Spread.of(p50[base]),
            base, None, lower_is_better=True)
        for subject, base, label in pairs
    ]  # fmt: skip


async def _detail_sides(
    bench: Bench, channels: list[aio_pika.abc.AbstractChannel]
) -> dict[str, tuple[Callable[[Any], Awaitable[None]], type]]:
    """The publish functions of ``fanout_detail``, by name, with the event class each publishes."""
    names = bench.names
    exchanges = [await channel.get_exchange(names.exchange, ensure=False) for channel in channels]
    transport = bench.app.transport
    (template,) = build_messages(order(OrderPlaced, 0), [bench.listener("bench:placed")])

    async def raw_on(exchange: aio_pika.abc.AbstractExchange, event: Any) -> None:
        message = aio_pika.Message(
            event.model_dump_json().encode(),
            content_type=JSON,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=uuid.uuid4().hex,
        )
        await exchange.publish(message, names.raw_publish, mandatory=True)

    def raw(count: int, *, over: int) -> Callable[[Any], Awaitable[None]]:
        async def publish(event: Any) -> None:
            await asyncio.gather(*(raw_on(exchanges[i % over], event) for i in range(count)))

        return publish

    def batch(count: int, *, headers: bool) -> Callable[[Any], Awaitable[None]]:
        async def publish(_event: Any) -> None:
            await transport.publish(
                [
                    OutgoingMessage(
                        queue=template.queue,
                        body=template.body,
                        headers=dict(template.headers) if headers else {},
                        correlation_id=template.correlation_id,
                        type=template.type,
                    )
                    for _ in range(count)
                ]
            )

        return publish

    return {
        "1 listener": (bench.dispatch, OrderPlaced),
        "3 listeners, 3 queues": (bench.dispatch, OrderSpread),
        "raw 1 publish": (raw(1, over=1), OrderPlaced),
        "raw 3, 1 channel": (raw(3, over=1), OrderPlaced),
        "raw 3, 3 channels": (raw(3, over=3), OrderPlaced),
        "transport 1, headers": (batch(1, headers=True), OrderPlaced),
        "transport 3, headers": (batch(3, headers=True), OrderPlaced),
        "transport 1, no headers": (batch(1, headers=False), OrderPlaced),
        "transport 3, no headers": (batch(3, headers=False), OrderPlaced),
    }


async def _rotating_rounds(
    bench: Bench, sides: dict[str, tuple[Callable[[Any], Awaitable[None]], type]]
) -> dict[str, list[float]]:
    """Every side once per sample, the order rotating sample by sample; the p50 (µs) of each side per round."""
    order_of = list(sides)
    for warm in range(20):  # connections, declarations (the spread queues), caches
        for side in order_of:
            publish, cls = sides[side]
            await publish(order(cls, warm))
    p50: dict[str, list[float]] = {side: [] for side in sides}
    clock = time.perf_counter_ns
    samples = bench.sizes.latency_samples
    for round_index in range(bench.sizes.rounds):
        times: dict[str, list[float]] = {side: [] for side in sides}
        for sample in range(samples):
            shift = sample % len(order_of)
            for side in order_of[shift:] + order_of[:shift]:
                publish, cls = sides[side]
                event = order(cls, round_index * samples + sample)
                start = clock()
                await publish(event)
                times[side].append((clock() - start) / 1e3)
        for side, values in times.items():
            p50[side].append(percentile(values, 50))
            bench.keep(f"fanout_detail.{side}", "p50", p50[side][-1])
    return p50


def _broker_pid() -> int | None:
    """The process of the local RabbitMQ node (``beam.smp`` running ``rabbit``), or ``None``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            beam = (entry / "comm").read_text().strip() == "beam.smp"
            if beam and b"rabbit" in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    return None


def _process_cpu_ns(pid: int) -> int:
    """The CPU time (ns) that every thread of ``pid`` has used so far (``/proc/PID/task/*/schedstat``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total


async def fanout_cpu(bench: Bench) -> list[Row]:
    """Who pays for more listeners: the broker's CPU and this process's per dispatch, 3 queued listeners vs 1.

    Not in the default run (``--only fanout_cpu``); needs the broker on this host (its ``beam.smp`` in
    ``/proc``). Blocks of sequential dispatches, the two sides alternating block by block (ABBA); per block the
    CPU time of every thread of the broker's process and of this one, and the wall time, divided by the
    dispatches. A pause before each block lets the broker finish the previous one's work; what the broker does
    on its own meanwhile (statistics, timers) lands in whichever block it falls in, which the median over
    rounds absorbs.
    """
    pid = _broker_pid()
    if pid is None:
        print("[bench] fanout_cpu: no local beam.smp running rabbit in /proc; skipped", file=sys.stderr)
        return []
    sides = (("3 listeners", OrderShipped), ("1 listener", OrderPlaced))
    block = max(bench.sizes.latency_samples // 3, 20)  # short blocks, many of them: this VM drifts in seconds
    figures: dict[str, Times] = {"broker": ([], []), "client": ([], []), "wall": ([], [])}
    for warm in range(20):
        for _, cls in sides:
            await bench.dispatch(order(cls, warm))
    for index, side in enumerate(_ladder(3 * bench.sizes.rounds)):
        cls = sides[side][1]
        events = [order(cls, index * block + i) for i in range(block)]
        await asyncio.sleep(0.02)
        broker, client, wall = _process_cpu_ns(pid), time.process_time_ns(), time.perf_counter_ns()
        for event in events:
            await bench.dispatch(event)
        wall = time.perf_counter_ns() - wall
        client = time.process_time_ns() - client
        await asyncio.sleep(0.02)
        broker = _process_cpu_ns(pid) - broker
        for figure, value in (("broker", broker), ("client", client), ("wall", wall)):
            figures[figure][side].append(value / block / 1e3)
            bench.keep(f"fanout_cpu.{figure}", sides[side][0], figures[figure][side][-1])
    await purge(bench.raw_channel, bench.names.publish)
    labels = {
        "broker": "broker CPU per dispatch (beam.smp, all threads)",
        "client": "client CPU per dispatch (this process)",
        "wall": "wall time per dispatch, sequential",
    }
    return [
        Row(f"fanout_cpu.{figure}", f"3 queued listeners: {label}", "µs", Spread.of(values[0]),
            Spread.of(values[1]), "1 listener", None, lower_is_better=True)
        for figure, label in labels.items()
        for values in (figures[figure],)
    ]  # fmt: skip


# -- 2: throughput of concurrent dispatches ----------------------------------------------------------------


async def throughput(bench: Bench) -> list[Row]:
    """2: ``in_flight`` concurrent publishers, each awaiting its publishes one after the other."""
    sizes = bench.sizes
    sides = (("queueable", bench.dispatch), ("raw", bench.raw_publish))
    per_lane = max(sizes.throughput_messages // sizes.in_flight, 1)

    async def one_round(publish: Callable[[Any], Awaitable[None]], base: int) -> tuple[float, float]:
        events = [order(OrderPlaced, base + i) for i in range(per_lane * sizes.in_flight)]

        async def lane(k: int) -> None:
            for event in events[k * per_lane : (k + 1) * per_lane]:
                await publish(event)

        start, cpu_start = time.perf_counter(), time.process_time()
        await asyncio.gather(*(lane(k) for k in range(sizes.in_flight)))
        cpu = (time.process_time() - cpu_start) / len(events) * 1e6
        return len(events) / (time.perf_counter() - start), cpu

    for _, publish in sides:
        await one_round(publish, 0)
    rates: dict[str, list[float]] = {name: [] for name, _ in sides}
    cpus: dict[str, list[float]] = {name: [] for name, _ in sides}
    for index, side in enumerate(_ladder(sizes.throughput_rounds)):
        name, publish = sides[side]
        rate, cpu = await one_round(publish, index * sizes.throughput_messages)
        rates[name].append(rate)
        cpus[name].append(cpu)
        bench.keep("throughput", name, rate)
        bench.keep("throughput.cpu", name, cpu)
    await purge(bench.raw_channel, bench.names.publish, bench.names.raw_publish)
    label = f"{sizes.in_flight} concurrent dispatch() in flight"
    return [
        Row("throughput", label, "msg/s", Spread.of(rates["queueable"]), Spread.of(rates["raw"]), "raw publish",
            0.9, lower_is_better=False),
        Row("throughput.cpu", f"{label}, client CPU per message", "µs", Spread.of(cpus["queueable"]),
            Spread.of(cpus["raw"]), "raw publish", None, lower_is_better=True),
    ]  # fmt: skip


# -- 4: consumer throughput --------------------------------------------------------------------------------


class _CountingTransport(RabbitMQTransport):
    """The real transport; it also notes the time of every ack (the end of a message's processing)."""

    def __init__(self, *args: Any, on_ack: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_ack = on_ack

    async def ack(self, token: Any) -> None:
        await super().ack(token)
        self._on_ack()


class _Drain:
    """Counts acks; the rate is (N - 1) / (time of ack N - time of ack 1), so connecting is not timed."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.first = self.last = 0.0
        self.cpu_first = self.cpu_last = 0.0
        self.done = asyncio.Event()

    def acked(self) -> None:
        self.count += 1
        if self.count == 1:
            self.first, self.cpu_first = time.perf_counter(), time.process_time()
        if self.count == self.total:
            self.last, self.cpu_last = time.perf_counter(), time.process_time()
            self.done.set()

    @property
    def rate(self) -> float:
        return (self.total - 1) / (self.last - self.first)

    @property
    def cpu(self) -> float:
        """This process's CPU time per message (µs) while draining."""
        return (self.cpu_last - self.cpu_first) / (self.total - 1) * 1e6


async def _fill(bench: Bench, side: int, base: int) -> None:
    """Pre-fill the consumer queue of ``side`` (0: queueable, 1: raw) with the same bytes, confirmed."""
    sizes = bench.sizes
    entry = bench.listener(CONSUME_LISTENER)
    events = [order(OrderConsumed, base + i) for i in range(sizes.consume_messages)]
    if side == 0:
        for start in range(0, len(events), 500):
            await bench.app.transport.publish(
                [m for e in events[start : start + 500] for m in build_messages(e, [entry])]
            )
        return
    raw = []
    for event in events:  # the same body and headers as queueable's, so the bytes on the wire match
        (message,) = build_messages(event, [entry], body=encode_event(event))
        raw.append(
            aio_pika.Message(
                message.body,
                headers=message.headers,
                content_type=JSON,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message.message_id,
            )
        )
    await publish_window(bench.raw_exchange, bench.names.raw_consume, raw)


async def _drain_queueable(bench: Bench) -> _Drain:
    """The worker of ``queueable-consume`` (decode, validate, resolve, invoke, ack) on the pre-filled queue."""
    queue = bench.names.consume
    drain = _Drain(bench.sizes.consume_messages)
    transport = _CountingTransport(bench.app.settings, queues=[queue], on_ack=drain.acked)
    prefetch = max(bench.app.settings.prefetch, DEFAULT_CONCURRENCY)  # as queueable-consume computes it
    options = WorkerOptions(queues=(queue,), prefetch=prefetch, concurrency=DEFAULT_CONCURRENCY)
    worker = Worker(bench.app.processor(), transport, options)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(drain.done.wait(), 120)
    finally:
        worker.stop()
        await task
    return drain


RAW_PREFETCH = 64


async def _drain_raw(bench: Bench) -> _Drain:
    """A naive aio-pika consumer: validate the body with pydantic, ack, one message at a time each."""
    drain = _Drain(bench.sizes.consume_messages)
    connection = await aio_pika.connect_robust(bench.url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=RAW_PREFETCH)
        queue = await channel.get_queue(bench.names.raw_consume, ensure=False)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            OrderConsumed.model_validate_json(message.body)
            await message.ack()
            drain.acked()

        tag = await queue.consume(on_message)
        await asyncio.wait_for(drain.done.wait(), 120)
        await queue.cancel(tag)
    finally:
        await connection.close()
    return drain


async def consumer(bench: Bench) -> list[Row]:
    """4: drain a pre-filled queue: the queueable worker vs a raw consumer that validates and acks each message.

    The worker runs with queueable-consume's defaults (prefetch, concurrency); the raw consumer with a prefetch
    of ``RAW_PREFETCH`` and a task per delivery (aio-pika's way). Filling is not timed.
    """
    sizes = bench.sizes
    rates: dict[str, list[float]] = {"queueable": [], "raw": []}
    cpus: dict[str, list[float]] = {"queueable": [], "raw": []}
    for index, side in enumerate(_ladder(sizes.consume_rounds)):
        await _fill(bench, side, index * sizes.consume_messages)
        gc.collect()
        drain = await (_drain_queueable(bench) if side == 0 else _drain_raw(bench))
        name = ("queueable", "raw")[side]
        rates[name].append(drain.rate)
        cpus[name].append(drain.cpu)
        bench.keep("consumer", name, drain.rate)
        bench.keep("consumer.cpu", name, drain.cpu)
    prefetch = max(bench.app.settings.prefetch, DEFAULT_CONCURRENCY)
    label = f"worker drains {sizes.consume_messages:,} msgs"
    return [
        Row("consumer", f"{label} (prefetch {prefetch} vs {RAW_PREFETCH})", "msg/s", Spread.of(rates["queueable"]),
            Spread.of(rates["raw"]), "raw consumer", 1.5, lower_is_better=False),
        Row("consumer.cpu", f"{label}, client CPU per message", "µs", Spread.of(cpus["queueable"]),
            Spread.of(cpus["raw"]), "raw consumer", None, lower_is_better=True),
    ]  # fmt: skip


# -- 5: deferred dispatch ------------------------------------------------------------------------------------

DEFERRED_TARGET_US = 50.0


async def deferred(bench: Bench) -> list[Row]:
    """5: what a request pays for ``deferred()`` + ``dispatch()`` (buffer only), and the flush after it.

    Like a request under ``DeferredDispatchMiddleware``: open the scope, dispatch (serialize the event, buffer
    a record), then flush after the "response" (validate, build the message, publish, confirm). Wall time, and
    this thread's CPU time. Each window starts right after the previous flush's confirm, when the interpreter
    runs cold and this VM's CPU has just woken from waiting: the worst spot a request can be in. Besides the
    p99 the table shows the share of windows over the 50 µs target, which says how far from the line it is.
    """
    sizes = bench.sizes
    dispatcher = bench.app.dispatcher
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    keys = ("buffer.p50", "buffer.p99", "buffer.over", "buffer.cpu.p99", "flush.p50", "flush.p99")
    figures: dict[str, list[float]] = {key: [] for key in keys}
    for round_index in range(-1, sizes.rounds):  # round -1 warms up
        buffered: list[float] = []
        buffered_cpu: list[float] = []
        flushed: list[float] = []
        events = [order(OrderPlaced, i) for i in range(sizes.deferred_samples)]
        for event in events:
            # The CPU clock is a system call here (no vDSO): it brackets the wall-clock window from outside, so
            # the wall figure carries no system call of the benchmark's own.
            cpu_start = cpu_clock()
            start = clock()
            scope = dispatcher.deferred()
            await scope.__aenter__()
            await dispatcher.dispatch(event)
            middle = clock()
            cpu_middle = cpu_clock()
            await scope.__aexit__(None, None, None)
            end = clock()
            buffered.append((middle - start) / 1e3)
            buffered_cpu.append((cpu_middle - cpu_start) / 1e3)
            flushed.append((end - middle) / 1e3)
        if round_index < 0:
            continue
        over = 100 * sum(value > DEFERRED_TARGET_US for value in buffered) / len(buffered)
        values = {
            "buffer.p50": percentile(buffered, 50),
            "buffer.p99": percentile(buffered, 99),
            "buffer.over": over,
            "buffer.cpu.p99": percentile(buffered_cpu, 99),
            "flush.p50": percentile(flushed, 50),
            "flush.p99": percentile(flushed, 99),
        }
        for key, value in values.items():
            figures[key].append(value)
            bench.keep(f"deferred.{key}", "queueable", value)
    await purge(bench.raw_channel, bench.names.publish)
    labels = {
        "buffer.p50": ("deferred() + dispatch(), buffer only, p50", "µs", None),
        "buffer.p99": ("deferred() + dispatch(), buffer only, p99", "µs", DEFERRED_TARGET_US),
        "buffer.over": (f"deferred() + dispatch(), share over {DEFERRED_TARGET_US:g} µs", "%", None),
        "buffer.cpu.p99": ("deferred() + dispatch(), buffer only, CPU p99", "µs", None),
        "flush.p50": ("flush after it (validate + 1 message), p50", "µs", None),
        "flush.p99": ("flush after it (validate + 1 message), p99", "µs", None),
    }
    return [
        Row(f"deferred.{key}", label, unit, Spread.of(figures[key]), None, "", target, lower_is_better=True)
        for key, (label, unit, target) in labels.items()
    ]


async def deferred_parts(bench: Bench) -> list[Row]:
    """Which part of the deferred window carries its tail, each timed where :func:`deferred` times the whole.

    Not in the default run (``--only deferred_parts``). Four sides, each sample timed right after the previous
    flush's confirm: the whole window (``deferred()``, enter, ``dispatch()``), the scope alone (``deferred()``
    and enter), ``dispatch()`` alone (in a scope entered untimed), and pydantic's ``to_json`` of the event alone
    (the snapshot's floor: no deferred dispatch can cost less). Every sample is followed by the same flush, so
    each side sees the same I/O. The sides alternate in ABCD DCBA blocks within every round. Per side: p50, p99
    and the share of samples over the 50 µs target. If that share grows with the part's p50, the tail is the
    machine's (stalls that strike at random, so a longer window meets more of them), not a slow step of its own.
    """
    sizes = bench.sizes
    dispatcher = bench.app.dispatcher
    serializer = OrderPlaced.__pydantic_serializer__  # type: ignore[attr-defined]
    clock = time.perf_counter_ns
    sides = ("window", "scope", "dispatch", "to_json")
    block = max(sizes.deferred_samples // 16, 10)
    figures: dict[tuple[str, str], list[float]] = {}
    for round_index in range(-1, sizes.rounds):  # round -1 warms up
        times: dict[str, list[float]] = {side: [] for side in sides}
        for side in (*sides, *reversed(sides)):
            for event in [order(OrderPlaced, i) for i in range(block)]:
                if side == "window":
                    start = clock()
                    scope = dispatcher.deferred()
                    await scope.__aenter__()
                    await dispatcher.dispatch(event)
                    end = clock()
                elif side == "scope":
                    start = clock()
                    scope = dispatcher.deferred()
                    await scope.__aenter__()
                    end = clock()
                    await dispatcher.dispatch(event)
                elif side == "dispatch":
                    scope = dispatcher.deferred()
                    await scope.__aenter__()
                    start = clock()
                    await dispatcher.dispatch(event)
                    end = clock()
                else:
                    start = clock()
                    serializer.to_json(event)
                    end = clock()
                    scope = dispatcher.deferred()
                    await scope.__aenter__()
                    await dispatcher.dispatch(event)
                await scope.__aexit__(None, None, None)
                times[side].append((end - start) / 1e3)
        if round_index < 0:
            continue
        for side, values in times.items():
            figures.setdefault((side, "p50"), []).append(percentile(values, 50))
            figures.setdefault((side, "p99"), []).append(percentile(values, 99))
            over = 100 * sum(value > DEFERRED_TARGET_US for value in values) / len(values)
            figures.setdefault((side, "over"), []).append(over)
    await purge(bench.raw_channel, bench.names.publish)
    labels = {
        "window": "deferred() + dispatch(), the whole window",
        "scope": "deferred() + enter, alone",
        "dispatch": "dispatch() in an entered scope, alone",
        "to_json": "to_json of the event, alone",
    }
    stats = {"p50": ("p50", "µs"), "p99": ("p99", "µs"), "over": (f"share over {DEFERRED_TARGET_US:g} µs", "%")}
    return [
        Row(f"deferred_parts.{side}.{stat}", f"{labels[side]}, {name}", unit, Spread.of(figures[side, stat]),
            None, "", None, lower_is_better=True)
        for side in sides
        for stat, (name, unit) in stats.items()
    ]  # fmt: skip


COLD_PAUSE_S = 0.0015


def _cold_pieces(bench: Bench) -> dict[str, Callable[[Any], Awaitable[int]]]:
    """The code that :func:`cold` times, by name; each returns its own wall time (ns)."""
    dispatcher = bench.app.dispatcher
    serializer = OrderPlaced.__pydantic_serializer__  # type: ignore[attr-defined]
    clock = time.perf_counter_ns

    async def window(event: Any) -> int:
        start = clock()
        scope = dispatcher.deferred()
        await scope.__aenter__()
        await dispatcher.dispatch(event)
        took = clock() - start
        scope.pending.clear()  # nothing to publish: only the request's share is measured here
        await scope.__aexit__(None, None, None)
        return took

    async def to_json(event: Any) -> int:
        start = clock()
        serializer.to_json(event)
        return clock() - start

    async def additions(_event: Any) -> int:
        start = clock()
        total = 0
        for step in range(100):
            total += step
        return clock() - start

    return {"deferred window": window, "to_json of the event": to_json, "100 additions": additions}


async def cold(bench: Bench) -> list[Row]:
    """How much slower code runs right after the process waited: the machine's share of the deferred figure.

    Not in the default run (``--only cold``). Three pieces of code, each timed back to back (warm) and right
    after a 1.5 ms sleep (cold, where a deferred dispatch starts: after the previous request's I/O): the
    deferred window itself (``deferred()``, enter, ``dispatch()``, without its flush), pydantic's ``to_json``
    of the event alone, and a pure-Python loop of 100 additions. Wall time per run, p50 and p99 per round.
    """
    pieces = _cold_pieces(bench)
    samples = max(bench.sizes.deferred_samples // 4, 100)
    figures: dict[tuple[str, str, int], list[float]] = {}
    for round_index in range(-1, bench.sizes.rounds):  # round -1 warms up
        events = [order(OrderPlaced, i) for i in range(samples)]
        for name, piece in pieces.items():
            for state in ("warm", "cold"):
                times = []
                for event in events:
                    if state == "cold":
                        await asyncio.sleep(COLD_PAUSE_S)
                    times.append(await piece(event) / 1e3)
                for q in (50, 99):
                    if round_index >= 0:
                        figures.setdefault((name, state, q), []).append(percentile(times, q))
    return [
        Row(f"cold.{name.replace(' ', '_')}.p{q}", f"{name}, after a {COLD_PAUSE_S * 1e3:g} ms sleep, p{q}", "µs",
            Spread.of(figures[name, "cold", q]), Spread.of(figures[name, "warm", q]), "back to back", None,
            lower_is_better=True)
        for name in pieces
        for q in (50, 99)
    ]  # fmt: skip


# -- 6: worker memory -------------------------------------------------------------------------------------------


MEMORY_GROWTH_BOUND_MB = 5.0


async def memory(bench: Bench) -> list[Row]:
    """6: the resident memory of a real ``queueable-consume`` process over ``memory_messages`` messages.

    The worker prints its RSS every ``memory_interval`` messages; this process publishes the messages (through
    queueable, 500 per confirmed batch) while it consumes. The growth is RSS at the end minus RSS after the
    warm-up (the first 20 % of the messages).
    """
    sizes = bench.sizes
    names = bench.names
    entry = bench.listener(MEM_LISTENER)
    executable = Path(sys.executable).with_name("queueable-consume")
    env = {
        **os.environ,
        "QUEUEABLE_URL": bench.url,
        "QUEUEABLE_QUEUE": names.memory,
        "QUEUEABLE_EXCHANGE": names.exchange,
        "BENCH_MEM_INTERVAL": str(sizes.memory_interval),
        "PYTHONPATH": str(BENCH_DIR),
    }
    process = await asyncio.create_subprocess_exec(
        str(executable), "mem_app:app", "--max-messages", str(sizes.memory_messages), "--log-level", "warning",
        cwd=BENCH_DIR, env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    samples: list[tuple[int, float]] = []

    async def read() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            record = json.loads(line)
            samples.append((record["messages"], record["rss_mb"]))

    reader = asyncio.create_task(read())
    transport = bench.app.transport
    start = time.perf_counter()
    try:
        async with asyncio.timeout(240):
            for base in range(0, sizes.memory_messages, 500):
                count = min(500, sizes.memory_messages - base)
                events = [order(OrderMem, base + i) for i in range(count)]
                await transport.publish([m for e in events for m in build_messages(e, [entry])])
            code = await process.wait()
            await reader
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    elapsed = time.perf_counter() - start
    if code != 0 or not samples:
        msg = f"the memory worker exited with {code} after {len(samples)} samples"
        raise RuntimeError(msg)
    bench.rounds["memory"] = {"samples": [float(x) for pair in samples for x in pair]}
    warm = [rss for seen, rss in samples if seen >= sizes.memory_messages * 0.2]
    growth = samples[-1][1] - warm[0]
    return [
        Row("memory.rss", f"worker RSS from {warm and samples[-len(warm)][0]:,} to {samples[-1][0]:,} msgs",
            "MB", Spread.of(warm), None, f"({samples[-1][0] / elapsed:,.0f} msg/s end to end)", None,
            lower_is_better=True),
        Row("memory.growth", "worker RSS growth after warm-up", "MB", Spread.of([growth]), None, "",
            MEMORY_GROWTH_BOUND_MB, lower_is_better=True),
    ]  # fmt: skip


SCENARIOS: dict[str, Callable[[Bench], Awaitable[list[Row]]]] = {
    "latency": latency,
    "throughput": throughput,
    "fanout": fan_out,
    "consumer": consumer,
    "deferred": deferred,
    "memory": memory,
}

#: Run only when asked for (``--only``): details behind a figure of the default run.
EXTRA_SCENARIOS: dict[str, Callable[[Bench], Awaitable[list[Row]]]] = {
    "fanout_detail": fanout_detail,
    "fanout_cpu": fanout_cpu,
    "cold": cold,
    "deferred_parts": deferred_parts,
}
