"""``queueable relay`` as a real process: SIGKILLed mid-batch it loses nothing; two at once publish each row once.

Run against PostgreSQL (FOR UPDATE SKIP LOCKED) and SQLite (BEGIN IMMEDIATE), publishing to the real broker.
"""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from _outbox_db import count, db_url, drain, id_report, pg_engine, stored_ids, unique_table
from apps.recorder import Job
from queueable.outbox import Outbox

if TYPE_CHECKING:
    from collections.abc import Iterator

    from _consumer_process import World
    from queueable import App

APP_SPEC = "apps.recorder:create_app"


def relay_command() -> list[str]:
    """The installed ``queueable`` script next to this interpreter, else the CLI through ``python -c``."""
    script = Path(sys.executable).with_name("queueable")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from queueable.cli import main; main()"]


@dataclass
class RelayProcess:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def relayed(self) -> int:
        """Messages this relay reported as published (debug log lines)."""
        return sum(int(n) for n in re.findall(r"relayed (\d+) message", self.output()))

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(name="kind", params=["postgresql", "sqlite"])
def fixture_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(name="url")
def fixture_url(kind: str, tmp_path: Path) -> str:
    return db_url(kind, tmp_path)


@pytest.fixture(name="engine")
def fixture_engine(kind: str, url: str) -> Iterator[sa.Engine]:
    engine = pg_engine() if kind == "postgresql" else sa.create_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture(name="table")
def fixture_table(engine: sa.Engine) -> Iterator[sa.Table]:
    table = unique_table(engine)
    yield table
    table.drop(engine)


@pytest.fixture(name="relays")
def fixture_relays() -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        relay.reap()


def start_relay(world: World, relays: list[RelayProcess], url: str, table: sa.Table, *args: str) -> RelayProcess:
    log = world.tmp / f"relay-{len(relays)}.log"
    command = [*relay_command(), "relay", APP_SPEC, "--db", url, "--table", table.name, "--log-level", "debug"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, *args],
            env=world.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=world.tmp,
        )
    relay = RelayProcess(proc, log)
    relays.append(relay)
    return relay


async def fill(engine: sa.Engine, table: sa.Table, app: App, n: int) -> list[str]:
    """Commit ``n`` Job events into the outbox in one transaction; their message ids, checked against the table."""
    outbox = Outbox(app, table=table)
    with engine.connect() as conn, conn.begin(), outbox.bind(conn) as scope:
        for i in range(n):
            await app.dispatch(Job(id=f"job-{i}"))
        ids = [m.message_id for m in scope.messages]
    stored = stored_ids(engine, table)
    assert stored == sorted(ids), f"the outbox holds {len(stored)} rows, not the {len(ids)} messages fill() built"
    return ids


async def test_a_relay_killed_mid_batch_loses_nothing(
    world: World, relays: list[RelayProcess], url: str, engine: sa.Engine, table: sa.Table
):
    """SIGKILL while a batch is claimed: after the lease, a second relay publishes what the first did not."""
    app = await world.app()
    ids = await fill(engine, table, app, 1500)
    first = start_relay(world, relays, url, table, "--batch-size", "300", "--lease", "2")

    claimed = table.c.claimed_by.is_not(None)
    deadline = time.monotonic() + 20
    while count(engine, table, claimed) == 0:
        assert first.proc.poll() is None, first.output()
        assert time.monotonic() < deadline, f"the relay never claimed a batch:\n{first.output()}"
        await asyncio.sleep(0.002)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)

    stranded = count(engine, table, claimed)
    assert stranded > 0, "the kill did not land mid-batch"
    assert count(engine, table) > 0

    second = start_relay(world, relays, url, table, "--interval", "0.1")
    deadline = time.monotonic() + 20  # the stranded batch waits for its 2 s lease
    while count(engine, table) > 0:
        assert second.proc.poll() is None, second.output()
        assert time.monotonic() < deadline, f"rows left after the lease:\n{second.output()}"
        await asyncio.sleep(0.1)
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(timeout=10) == 0, second.output()
    assert second.relayed() >= stranded

    drained = await drain(world.url, world.queue, expected=len(ids))
    published = [message.message_id for message in drained]
    # Nothing lost and nothing foreign; only a message of the killed batch may appear twice.
    assert set(published) == set(ids), id_report(drained, ids)
    assert len(published) - len(ids) <= 300, id_report(drained, ids)
    assert max(collections.Counter(published).values()) <= 2, id_report(drained, ids)


async def test_two_relays_at_once_publish_every_row_once(
    world: World, relays: list[RelayProcess], url: str, engine: sa.Engine, table: sa.Table
):
    """Two relay processes on one outbox: every message reaches the broker exactly once, both did work."""
    app = await world.app()
    ids = await fill(engine, table, app, 1500)
    both = [start_relay(world, relays, url, table, "--batch-size", "20", "--interval", "0.05") for _ in range(2)]

    deadline = time.monotonic() + 30
    while count(engine, table) > 0:
        assert all(r.proc.poll() is None for r in both), "\n".join(r.output() for r in both)
        assert time.monotonic() < deadline, "the relays did not empty the outbox in time"
        await asyncio.sleep(0.1)
    for relay in both:
        relay.proc.send_signal(signal.SIGTERM)
    codes = [relay.proc.wait(timeout=10) for relay in both]

    drained = await drain(world.url, world.queue, expected=len(ids))
    published = [message.message_id for message in drained]
    duplicates = [k for k, n in collections.Counter(published).items() if n > 1]
    assert duplicates == [], id_report(drained, ids)
    assert sorted(published) == sorted(ids), id_report(drained, ids)
    assert codes == [0, 0]
    assert all(relay.relayed() > 0 for relay in both), [relay.relayed() for relay in both]
