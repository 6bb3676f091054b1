"""``RetryPolicy``: how often and how late a failing queued listener is tried again."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from queueable.errors import ConfigurationError, Reject

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by attempts and by a maximum delay.

    Attempt ``n`` (1-based) that fails is retried after
    ``min(initial_delay * multiplier ** (n - 1), max_delay)`` seconds, spread by ``± jitter`` (a fraction),
    until ``max_attempts`` attempts have been made; then the message is dead-lettered. Exceptions that are
    instances of ``dont_retry`` (and :class:`queueable.Reject`) go to the dead-letter queue at once.

    ``RetryPolicy()`` makes 5 attempts over about 15 s (1, 2, 4, 8 s apart);
    ``RetryPolicy.never()`` dead-letters on the first failure.
    """

    max_attempts: int = 5
    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1
    dont_retry: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be a finite number, got {value}"
            for name, value in (
                ("initial_delay", self.initial_delay),
                ("multiplier", self.multiplier),
                ("max_delay", self.max_delay),
            )
            if not math.isfinite(value)
        ]
        if self.max_attempts < 1:
            problems.append(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_delay < 0:
            problems.append(f"initial_delay must be >= 0, got {self.initial_delay}")
        if self.multiplier < 1:
            problems.append(f"multiplier must be >= 1, got {self.multiplier}")
        if self.max_delay < self.initial_delay:
            problems.append(f"max_delay ({self.max_delay}) must be >= initial_delay")
        if not 0 <= self.jitter <= 1:
            problems.append(f"jitter must be a fraction in [0, 1], got {self.jitter}")
        if problems:
            raise ConfigurationError("invalid RetryPolicy: " + "; ".join(problems))

    @classmethod
    def never(cls) -> RetryPolicy:
        """A policy that dead-letters a message on its first failure."""
        return cls(max_attempts=1)

    def delay_for(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one."""
        try:
            base = min(self.initial_delay * self.multiplier ** (attempt - 1), self.max_delay)
        except OverflowError:  # past attempt ~1,025 with multiplier 2: far beyond max_delay anyway
            base = self.max_delay
        if self.jitter and base:
            spread = (rng or _rng).uniform(-self.jitter, self.jitter)
            base = min(base * (1 + spread), self.max_delay)
        return max(base, 0.0)

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` may be retried at all (attempts aside)."""
        return not isinstance(exc, (Reject, *self.dont_retry))


_rng = random.Random()  # noqa: S311 - jitter, not cryptography
