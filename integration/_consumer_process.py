"""Run the real ``queueable-consume`` as a child process and watch what it does, for the process-level tests.

A :class:`World` is one test's private corner of a broker: a unique work queue and exchange, a record file the
listeners of ``apps.recorder`` append to, and the consumer processes started in it. Everything waits with a
deadline, so a broken consumer fails a test in seconds instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika

from apps import recorder
from queueable.transport.rabbitmq import DELAY_BUCKETS_MS, delay_queue_for

if TYPE_CHECKING:
    import signal
    from collections import Counter
    from collections.abc import Callable, Sequence

    from queueable import App

INTEGRATION_DIR = Path(__file__).resolve().parent
APP_SPEC = "apps.recorder:create_app"


def consume_command() -> list[str]:
    """The installed ``queueable-consume`` script next to this interpreter, else ``python -m queueable.cli``."""
    script = Path(sys.executable).with_name("queueable-consume")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from queueable.cli import consume_main; consume_main()"]


@dataclass
class Consumer:
    """One ``queueable-consume`` child process; its stdout and stderr go to ``log``."""

    proc: subprocess.Popen[bytes]
    log: Path
    args: tuple[str, ...]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def output(self) -> str:
        """Everything the process printed so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to this process only (never by name)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        """Wait for the process to exit; fail with its output if it does not within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                msg = f"consumer {self.pid} still running after {timeout} s; output:\n{self.output()[-4000:]}"
                raise AssertionError(msg)
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def reap(self) -> None:
        """SIGKILL the process if it still runs (test teardown)."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


@dataclass
class World:
    """A test's queue, exchange, record file and consumers, on the broker at ``url``."""

    url: str
    queue: str
    exchange: str
    tmp: Path
    consumers: list[Consumer] = field(default_factory=list)
    _apps: list[App] = field(default_factory=list)

    @property
    def record_path(self) -> Path:
        return self.tmp / "record.log"

    @property
    def dead_queue(self) -> str:
        return self.queue + ".dead"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a consumer in this world."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUEABLE_")}
        pythonpath = [str(INTEGRATION_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
        env.update(
            {
                "QUEUEABLE_URL": self.url,
                "QUEUEABLE_QUEUE": self.queue,
                "QUEUEABLE_EXCHANGE": self.exchange,
                recorder.RECORD_ENV: str(self.record_path),
                "PYTHONPATH": os.pathsep.join(pythonpath),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra)
        return env

    # -- processes ---------------------------------------------------------------------------------

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> Consumer:
        """Start ``queueable-consume apps.recorder:create_app *args`` (without waiting for it to consume)."""
        return self.spawn_app(APP_SPEC, *args, env=env)

    def spawn_app(self, app_spec: str, *args: str, env: dict[str, str] | None = None) -> Consumer:
        """Start ``queueable-consume APP_SPEC *args``."""
        log = self.tmp / f"consumer-{len(self.consumers)}.log"
        command = [*consume_command(), app_spec, *args]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
                env=env or self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.tmp,
            )
        consumer = Consumer(proc, log, tuple(args))
        self.consumers.append(consumer)
        return consumer

    async def start(self, *args: str, env: dict[str, str] | None = None, timeout: float = 20) -> Consumer:
        """Start a consumer and wait until the broker shows one more consumer on the work queue."""
        before = await self.consumer_count()
        consumer = self.spawn(*args, env=env)
        await self.until(
            lambda count: count > before,
            self.consumer_count,
            timeout=timeout,
            what=f"consumer {consumer.pid} to subscribe to {self.queue}",
            consumer=consumer,
        )
        return consumer

    def reap(self) -> None:
        for consumer in self.consumers:
            consumer.reap()

    def outputs(self) -> str:
        """The output of every consumer, for assertion messages."""
        return "\n".join(
            f"--- consumer {c.pid} {c.args} rc={c.returncode}\n{c.output()[-3000:]}" for c in self.consumers
        )

    # -- the broker ----------------------------------------------------------------------------------

    async def queue_state(self, name: str | None = None) -> tuple[int, int]:
        """(messages ready, consumers) of a queue; (0, 0) if it does not exist yet."""
        connection = await aio_pika.connect(self.url, timeout=5)
        try:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name or self.queue, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                return 0, 0
            result = queue.declaration_result
            return result.message_count or 0, result.consumer_count or 0
        finally:
            await connection.close()

    async def consumer_count(self) -> int:
        with contextlib.suppress(OSError, aio_pika.exceptions.AMQPConnectionError):
            return (await self.queue_state())[1]
        return 0

    async def publish_raw(self, body: bytes, headers: dict[str, Any] | None = None, **properties: Any) -> str:
        """Publish a raw persistent message to the work queue (through the exchange), confirmed; its id."""
        message_id = properties.pop("message_id", None) or os.urandom(8).hex()
        properties.setdefault("content_type", "application/json")
        connection = await aio_pika.connect(self.url, timeout=5)
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(self.exchange, ensure=True)
            message = aio_pika.Message(
                body,
                headers=headers or {},
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                **properties,
            )
            await exchange.publish(message, routing_key=self.queue, mandatory=True, timeout=10)
        finally:
            await connection.close()
        return message_id

    async def take_dead(self, count: int, timeout: float = 20) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Wait for ``count`` messages in the dead-letter queue and take (ack) them."""
        taken: list[aio_pika.abc.AbstractIncomingMessage] = []
        deadline = time.monotonic() + timeout
        connection = await aio_pika.connect(self.url, timeout=5)
        try:
            channel = await connection.channel()
            queue = None
            while len(taken) < count:
                if time.monotonic() > deadline:
                    ids = [m.message_id for m in taken]
                    msg = f"{len(taken)} of {count} dead letters after {timeout} s ({ids}):\n{self.outputs()}"
                    raise AssertionError(msg)
                if queue is None:
                    try:
                        queue = await channel.declare_queue(self.dead_queue, passive=True)
                    except aio_pika.exceptions.ChannelClosed:
                        channel = await connection.channel()
                        await asyncio.sleep(0.1)
                        continue
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    await asyncio.sleep(0.1)
                    continue
                await message.ack()
                taken.append(message)
        finally:
            await connection.close()
        return taken

    async def app(self, **overrides: Any) -> App:
        """A producer-side app for this world, with settings ``overrides`` (closed at teardown)."""
        overrides = {"url": self.url, "default_queue": self.queue, "exchange": self.exchange, **overrides}
        app = recorder.create_app(**overrides)
        self._apps.append(app)
        return app

    async def close_apps(self) -> None:
        for app in self._apps:
            with contextlib.suppress(Exception):
                await app.close()

    async def delete_topology(self, extra_queues: Sequence[str] = ()) -> None:
        """Best-effort removal of this world's queues (work, dead, delay up to 10 s) and exchange."""
        delays = [delay_queue_for(self.queue, ms) for ms in DELAY_BUCKETS_MS if ms <= 10_000]
        names = [self.queue, self.dead_queue, *delays, *extra_queues]
        with contextlib.suppress(Exception):
            connection = await aio_pika.connect(self.url, timeout=5)
            try:
                for name in names:
                    with contextlib.suppress(Exception):
                        channel = await connection.channel()
                        await channel.queue_delete(name)
                with contextlib.suppress(Exception):
                    channel = await connection.channel()
                    await channel.exchange_delete(self.exchange)
            finally:
                await connection.close()

    # -- waiting -------------------------------------------------------------------------------------

    def handled(self) -> Counter[str]:
        """How many times each event id was handled so far."""
        return recorder.handled_counts(self.record_path)

    def records(self) -> list[recorder.Line]:
        return recorder.read_records(self.record_path)

    async def until_handled(
        self, ids: Sequence[str], timeout: float = 30, consumer: Consumer | None = None
    ) -> Counter[str]:
        """Wait until every id in ``ids`` was handled at least once (failing early if ``consumer`` exits)."""
        wanted = set(ids)

        async def missing() -> set[str]:
            return wanted - set(self.handled())

        await self.until(
            lambda left: not left, missing, timeout=timeout, what="every event to be handled", consumer=consumer
        )
        return self.handled()

    async def until(
        self,
        done: Callable[[Any], bool],
        probe: Callable[[], Any],
        *,
        timeout: float,
        what: str,
        consumer: Consumer | None = None,
    ) -> Any:
        """Poll ``probe()`` (a coroutine function) until ``done(value)``; fail with the consumers' output."""
        deadline = time.monotonic() + timeout
        while True:
            value = await probe()
            if done(value):
                return value
            if consumer is not None and consumer.returncode is not None:
                code = consumer.returncode
                msg = f"consumer {consumer.pid} exited with {code} waiting for {what}:\n{self.outputs()}"
                raise AssertionError(msg)
            if time.monotonic() > deadline:
                shown = value if not isinstance(value, set) else sorted(value)[:20]
                msg = f"timed out after {timeout} s waiting for {what} (last: {shown}):\n{self.outputs()}"
                raise AssertionError(msg)
            await asyncio.sleep(0.1)
