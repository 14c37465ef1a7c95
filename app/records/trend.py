"""A product's verdict rate and normalised-score drift per hour or day, read from the inspection record.

Why in SQL, on both dialects alike: a busy line records millions of rows a month, and the product page asks for
the trend on every visit; the database groups and ranks them next to the data and the service receives one row
per bucket. Buckets are cut from the stored text time (``2024-05-01T12:…Z``: its first 13 characters are the
hour, its first 10 the day, in UTC), so SQLite and PostgreSQL group by the same ``substr`` and agree exactly.

The high percentile is the **nearest-rank** one (the smallest recorded value with at least ``PERCENTILE`` % of
the bucket at or below it: an actual score, never an interpolation), computed with ``ROW_NUMBER()`` over the
bucket in both dialects; the calibration reference (``reference``) uses the same rule on the leave-one-out
scores, so the two lines on the chart mean the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from app.errors import BadRequestError
from app.jobs.job_db import JobDatabase
from app.records.pages import time_text

Bucket = Literal["hour", "day"]
PERCENTILE = 95  # the drift line: a few strong scores per bucket move it long before the mean moves
MAX_BUCKETS = 744  # 31 days of hours, or about two years of days: one chart's worth, bounded work per request
_PREFIX = {"hour": 13, "day": 10}  # characters of the stored time that name the bucket
_STEP = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
_DEFAULT_SPAN = {"hour": timedelta(hours=24), "day": timedelta(days=30)}


def nearest_rank(values: Sequence[float], percentile: int = PERCENTILE) -> float | None:
    """The nearest-rank percentile of ``values`` (None when empty); the rule the SQL below applies per bucket."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[(percentile * len(ordered) + 99) // 100 - 1]


def floor_to(moment: datetime, bucket: Bucket) -> datetime:
    """The start (UTC) of the bucket holding ``moment`` (a time without a zone is UTC)."""
    moment = _aware(moment).replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0) if bucket == "day" else moment


def span(bucket: Bucket, since: datetime | None, until: datetime | None,
         now: datetime | None = None) -> tuple[datetime, datetime]:
    """Whole buckets covering ``[since, until)`` (rounded out to bucket edges): ``until`` defaults to now,
    ``since`` to a day of hours or 30 days of days before it. 400 ``invalid_range`` for an empty range or one
    of more than ``MAX_BUCKETS`` buckets."""
    step = _STEP[bucket]
    last = _aware(until or now or datetime.now(UTC))
    end = floor_to(last, bucket)
    if last > end:
        end += step  # the bucket holding `until` is part of the range, as far as it is filled
    start = floor_to(since, bucket) if since is not None else end - _DEFAULT_SPAN[bucket]
    count = (end - start) // step
    if count < 1:
        raise BadRequestError("`since` must be before `until`", code="invalid_range")
    if count > MAX_BUCKETS:
        raise BadRequestError(f"{count} {bucket} buckets asked for; at most {MAX_BUCKETS} per request (use a "
                              f"shorter range or bucket=day)", code="invalid_range")
    return start, end


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _sql(prefix: int) -> tuple[str, str]:
    key = f"substr(time, 1, {prefix})"
    where = "WHERE category = ? AND time >= ? AND time < ?"
    counts = (f"SELECT {key} AS bucket, COUNT(*) AS inspections, "
              "SUM(CASE WHEN verdict = 'anomalous' THEN 1 ELSE 0 END) AS anomalous, "
              "SUM(CASE WHEN verdict = 'normal' THEN 1 ELSE 0 END) AS normal, "
              "COUNT(score_normalized) AS scored, AVG(score_normalized) AS score_mean, "
              f"MAX(score_normalized) AS score_max FROM inspections {where} GROUP BY {key}")
    high = ("SELECT bucket, score_normalized AS score_high FROM ("
            f"SELECT {key} AS bucket, score_normalized, "
            f"ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY score_normalized) AS pos, "
            f"COUNT(*) OVER (PARTITION BY {key}) AS n "
            f"FROM inspections {where} AND score_normalized IS NOT NULL) ranked "
            f"WHERE pos = (n * {PERCENTILE} + 99) / 100")
    return counts, high


def trend(db: JobDatabase, category: str, bucket: Bucket, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """One dict per bucket from ``start`` to ``end`` (from ``span``), oldest first, empty buckets included
    (a gap in the line is a quiet hour, not a missing point)."""
    counts_sql, high_sql = _sql(_PREFIX[bucket])
    args = (category, time_text(start), time_text(end))
    with db.tx() as tx:
        counts = {r["bucket"]: r for r in tx.all(counts_sql, args)}
        highs = {r["bucket"]: r["score_high"] for r in tx.all(high_sql, args)}
    out, moment = [], start
    while moment < end:
        key = time_text(moment)[:_PREFIX[bucket]]
        row = counts.get(key) or {}
        anomalous, normal = int(row.get("anomalous") or 0), int(row.get("normal") or 0)
        out.append({
            "start": time_text(moment), "inspections": int(row.get("inspections") or 0),
            "anomalous": anomalous, "normal": normal,
            "anomalous_rate": anomalous / (anomalous + normal) if anomalous + normal else None,
            "scored": int(row.get("scored") or 0), "score_mean": _float(row.get("score_mean")),
            "score_p95": _float(highs.get(key)), "score_max": _float(row.get("score_max")),
        })
        moment += _STEP[bucket]
    return out


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def reference(calibration: dict[str, Any] | None, version: int | None) -> dict[str, Any] | None:
    """What the active version's good evidence scores, normalised like predictions (score / threshold): the
    leave-one-out scores of its good images and their light views, and the false-alarm rate it expects.
    None without a calibration with a positive threshold (nothing to normalise by)."""
    cal = calibration or {}
    threshold = cal.get("threshold")
    if version is None or not threshold or not math.isfinite(threshold) or threshold <= 0:
        return None
    scores = [float(s) / threshold for s in cal.get("normal_scores") or []]
    return {"version": version, "threshold": float(threshold), "normal_scores": len(scores),
            "score_mean": sum(scores) / len(scores) if scores else None, "score_p95": nearest_rank(scores),
            "score_max": max(scores) if scores else None,
            "expected_false_alarm_rate": cal.get("expected_false_alarm_rate")}
