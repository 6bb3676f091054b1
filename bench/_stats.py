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
    values: tuple[float, ...]  # one per round, in the order the rounds ran

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(
            median=statistics.median(values),
            q1=percentile(values, 25),
            q3=percentile(values, 75),
            low=min(values),
            high=max(values),
            values=tuple(values),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "iqr": [self.q1, self.q3],
            "min": self.low,
            "max": self.high,
            "rounds": list(self.values),
        }


@dataclass(frozen=True, slots=True)
class Row:
    """A line of the results table: queueable's figure, its baseline's, and their ratio against a target.

    The ratio is paired: round *i* of queueable against round *i* of the baseline, which ran next to it (in the
    same round, or in the adjacent one of the ABBA ladder), so slow drift cancels; the table shows the median of
    these per-round ratios with their interquartile range. ``target`` is a bound on that median ratio
    (``<=`` when ``lower_is_better``, else ``>=``), or on ``subject.median`` when there is no baseline.
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
    def ratios(self) -> Spread | None:
        """The per-round ratios subject / baseline (``None`` without a baseline)."""
        if self.baseline is None:
            return None
        pairs = list(zip(self.subject.values, self.baseline.values, strict=True))
        return Spread.of([a / b for a, b in pairs if b])

    @property
    def ratio(self) -> float | None:
        ratios = self.ratios
        return ratios.median if ratios is not None else None

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
            "ratio_iqr": [self.ratios.q1, self.ratios.q3] if self.ratios is not None else None,
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
    """The rows as a Markdown table: medians over rounds, interquartile ranges in brackets."""
    header = ("figure", "unit", "queueable", "baseline", "ratio", "target", "met")
    lines = [header]
    for row in rows:
        ratios = row.ratios
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
                f"{ratios.median:.2f}x [{ratios.q1:.2f}-{ratios.q3:.2f}]" if ratios is not None else "-",
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
