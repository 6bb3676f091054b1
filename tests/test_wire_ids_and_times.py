"""The wire helpers on the dispatch hot path: message ids and ISO timestamps match the stdlib exactly."""

from __future__ import annotations

import math
import random
import uuid
from datetime import UTC, datetime

import pytest

from queueable._wire import iso_now, new_message_id


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
