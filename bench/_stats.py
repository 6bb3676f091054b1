"""Statistics for the benchmark: percentiles of one round, and the median and spread over rounds."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Spread:
    """One figure over repeated rounds: its median, interquartile range and extremes."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(
            median=statistics.median(values),
            q1=percentile(values, 25),
            q3=percentile(values, 75),
            low=min(values),
            high=max(values),
            rounds=len(values),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "iqr": [self.q1, self.q3],
            "min": self.low,
            "max": self.high,
            "rounds": self.rounds,
        }


@dataclass(frozen=True, slots=True)
class Row:
    """A line of the results table: queueable's figure, its baseline's, and their ratio against a target.

    ``target`` is a ratio bound (``ratio <= target`` when ``lower_is_better``, else ``ratio >= target``), or
    an absolute bound on ``subject.median`` when there is no baseline.
    """

    key: str
    label: str
    unit: str
    subject: Spread
    baseline: Spread | None
    baseline_label: str
    target: float | None
    lower_is_better: bool

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline.median:
            return None
        return self.subject.median / self.baseline.median

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        value = self.ratio if self.baseline is not None else self.subject.median
        if value is None:
            return None
        return value <= self.target if self.lower_is_better else value >= self.target

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "unit": self.unit,
            "queueable": self.subject.as_dict(),
            "baseline": self.baseline.as_dict() if self.baseline is not None else None,
            "baseline_label": self.baseline_label,
            "ratio": self.ratio,
            "target": self.target,
            "target_kind": ("<=" if self.lower_is_better else ">=") + (" ratio" if self.baseline else " abs"),
            "met": self.met,
        }


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(spread: Spread | None) -> str:
    if spread is None:
        return "-"
    return f"{_num(spread.median)} [{_num(spread.q1)}-{_num(spread.q3)}]"


def table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (medians with the interquartile range over rounds in brackets)."""
    header = ("figure", "unit", "queueable", "baseline", "ratio", "target", "met")
    lines = [header]
    for row in rows:
        ratio = row.ratio
        if row.target is None:
            target = "-"
        else:
            sign = "≤" if row.lower_is_better else "≥"
            target = f"{sign} {row.target:g}" + ("x" if row.baseline is not None else f" {row.unit}")
        met = {True: "yes", False: "**no**", None: "-"}[row.met]
        baseline = (
            f"{_cell(row.baseline)} {row.baseline_label}" if row.baseline is not None else row.baseline_label
        )
        lines.append(
            (
                row.label,
                row.unit,
                _cell(row.subject),
                baseline.strip() or "-",
                f"{ratio:.2f}x" if ratio is not None else "-",
                target,
                met,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)) + " |")
        if index == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)
