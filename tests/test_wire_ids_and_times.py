"""The wire helpers on the dispatch hot path: message ids and ISO timestamps match the stdlib exactly."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime

import pytest

from queueable._wire import OutgoingMessage, iso_now, new_message_id, outgoing


def _reference(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def test_message_ids_are_uuid4_hex() -> None:
    """Every id is 32 lowercase hex characters that parse as a version-4, RFC 4122 UUID."""
    for _ in range(2000):
        message_id = new_message_id()
        parsed = uuid.UUID(hex=message_id)
        assert len(message_id) == 32
        assert message_id == parsed.hex
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_message_ids_are_unique() -> None:
    """Ids drawn in a row never repeat."""
    assert len({new_message_id() for _ in range(50_000)}) == 50_000


def test_message_ids_are_unique_across_threads() -> None:
    """Threads drawing ids at once from the drawn-ahead ids never get the same one.

    The interpreter switches threads every microsecond here (5 ms by default, where they would barely overlap).
    """
    drawn: list[list[str]] = [[] for _ in range(8)]

    def draw(into: list[str]) -> None:
        into.extend(new_message_id() for _ in range(20_000))

    threads = [threading.Thread(target=draw, args=(into,)) for into in drawn]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    every = [message_id for into in drawn for message_id in into]
    assert len(every) == 160_000
    assert len(set(every)) == 160_000


_FORK_SCRIPT = """
import ctypes, os, sys
from queueable._wire import new_message_id
new_message_id()  # the parent has ids drawn ahead now
# os.fork runs Python's fork hooks; libc's fork, as uWSGI forks its workers by default, does not.
fork = os.fork if sys.argv[1] == "os.fork" else ctypes.CDLL(None).fork
read, write = os.pipe()
pid = fork()
if pid == 0:
    os.close(read)
    os.write(write, ",".join(new_message_id() for _ in range(20)).encode())
    os._exit(0)
os.close(write)
os.waitpid(pid, 0)
child = set(os.read(read, 65536).decode().split(","))
parent = {new_message_id() for _ in range(20)}
assert len(child) == 20, child
print(len(child & parent))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("fork", ["os.fork", "libc fork"])
def test_a_forked_child_does_not_reuse_the_ids_its_parent_drew_ahead(fork: str) -> None:
    """After a fork, with or without Python's fork hooks, parent and child both draw ids: none is drawn by both."""
    result = subprocess.run(  # noqa: S603 - our own script; a fresh interpreter, as forking pytest would fork its threads
        [sys.executable, "-c", _FORK_SCRIPT, fork], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "0"


@pytest.mark.parametrize(
    "ts",
    [0.0, 0.0005, 0.0015, 0.9995, 0.9999995, 1.9999999, 1e9 + 0.0005, 1764417600.9999996, 1764417600.0009995,
     253402300799.999, -1.5, -0.0004],
)  # fmt: skip
def test_iso_now_edges_match_datetime(ts: float) -> None:
    """Rounding at millisecond and second boundaries, and times before 1970, give datetime's text."""
    assert iso_now(ts) == _reference(ts)


def test_iso_now_random_times_match_datetime() -> None:
    """Random timestamps, in any order (so the per-second cache is hit and missed), give datetime's text."""
    rng = random.Random(6)
    stamps = [rng.uniform(0, 4e9) for _ in range(3000)]
    stamps += [1764417600 + rng.randrange(0, 3_000_000) / 1e6 for _ in range(3000)]
    for ts in stamps:
        assert iso_now(ts) == _reference(ts)


def test_iso_now_nan_is_an_error_like_datetime() -> None:
    """A NaN clock fails as datetime does instead of producing a bogus timestamp."""
    with pytest.raises(ValueError, match="NaN"):
        iso_now(math.nan)


def test_iso_now_defaults_to_the_current_time() -> None:
    """Without a clock it formats time.time(): a UTC timestamp with milliseconds."""
    text = iso_now()
    parsed = datetime.fromisoformat(text)
    assert parsed.tzinfo == UTC
    assert abs(parsed.timestamp() - datetime.now(UTC).timestamp()) < 5
    assert text.endswith("+00:00")
    assert len(text.split(".")[1]) == len("123+00:00")


def test_outgoing_builds_what_the_constructor_builds() -> None:
    """The dispatch path's constructor gives a message equal in every field, as frozen as the class's own."""
    values = {
        "queue": "mail",
        "body": b"{}",
        "headers": {"x-queueable-attempt": 1},
        "message_id": "m1",
        "correlation_id": "c1",
        "timestamp": 1_767_225_600.25,
        "content_type": "application/json",
        "type": "order.placed",
    }
    assert [each.name for each in dataclasses.fields(OutgoingMessage)] == list(values)
    built = outgoing(*values.values())
    assert type(built) is OutgoingMessage
    assert built == OutgoingMessage(**values)
    assert dataclasses.asdict(built) == values
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.queue = "other"  # type: ignore[misc]
