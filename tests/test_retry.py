"""RetryPolicy: backoff, cap, jitter, validation."""

from __future__ import annotations

import math
import random

import pytest

from queueable import ConfigurationError, Reject, Retry, RetryPolicy


def test_backoff_grows_and_is_capped():
    """Delays multiply per attempt and never exceed max_delay."""
    policy = RetryPolicy(initial_delay=1, multiplier=2, max_delay=5, jitter=0)
    assert [policy.delay_for(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]


def test_jitter_stays_within_its_fraction():
    """Jitter spreads delays by at most ± the fraction and never past the cap."""
    policy = RetryPolicy(initial_delay=10, multiplier=1, max_delay=10.5, jitter=0.1)
    rng = random.Random(1)
    delays = [policy.delay_for(1, rng=rng) for _ in range(200)]
    assert min(delays) >= 9
    assert max(delays) <= 10.5
    assert len(set(delays)) > 100


def test_never_dead_letters_on_first_failure():
    """RetryPolicy.never() allows a single attempt."""
    assert RetryPolicy.never().max_attempts == 1


def test_reject_and_dont_retry_are_not_retryable():
    """Reject and listed exception types skip retries."""
    policy = RetryPolicy(dont_retry=(KeyError,))
    assert not policy.is_retryable(Reject("no"))
    assert not policy.is_retryable(KeyError("k"))
    assert policy.is_retryable(ValueError("v"))


def test_invalid_policies_name_every_problem():
    """All invalid fields are reported together."""
    with pytest.raises(ConfigurationError, match=r"max_attempts must be >= 1.*multiplier must be >= 1"):
        RetryPolicy(max_attempts=0, multiplier=0.5)
    with pytest.raises(ConfigurationError, match="jitter"):
        RetryPolicy(jitter=2)


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_delays_are_refused(value):
    """An infinite or NaN delay cannot be scheduled: it is refused where it is written, not when a message
    fails (NaN passed every comparison before, and infinity overflowed the delay queue's name).
    """
    with pytest.raises(ConfigurationError, match="initial_delay must be a finite number"):
        RetryPolicy(initial_delay=value)
    with pytest.raises(ConfigurationError, match="max_delay must be a finite number"):
        RetryPolicy(max_delay=value)
    with pytest.raises(ValueError, match="finite number of seconds"):
        Retry(delay=value)


def test_a_huge_attempt_number_gets_the_maximum_delay_instead_of_overflowing():
    """2.0 ** 1100 overflows a float: a policy with many attempts (or a forged attempt header) got
    OverflowError out of the worker's decision, which requeued the message forever.
    """
    policy = RetryPolicy(max_attempts=1_000_000, initial_delay=1, max_delay=300, jitter=0)
    assert policy.delay_for(1_100) == 300
    assert policy.delay_for(10**9) == 300
