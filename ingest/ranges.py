"""What values are accepted at the edge, beyond what the schema says about their types.

A value can be well-typed and still absurd: an event in the year 9999 (its customer would look
brand new for ever), an amount of 1e308 (lifetime value becomes infinite), an id that is blank or
carries a newline or NUL (it cannot be shown, searched or exported safely). Such events are refused
here, with the reason, before anything downstream can choke on them. The bounds are configuration
(`CDP_MAX_FUTURE`, `CDP_MAX_AMOUNT`).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

EARLIEST = datetime(1900, 1, 1, tzinfo=timezone.utc)
EARLIEST_TEXT = "1900-01-01T00:00:00"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class OutOfRange(ValueError):
    """A well-typed value outside what the platform accepts; the message names the field."""


class TimeWindow:
    """Event times from 1900-01-01 to now + `max_future` seconds; 'now' is re-read once a second."""

    def __init__(self, max_future: float = 86400.0):
        self.max_future = max_future
        self._checked_at = -1.0
        self.latest = EARLIEST
        self.latest_text = EARLIEST_TEXT  # first 19 characters of the ISO form, for comparing as text

    def refresh(self) -> None:
        now = time.time()
        if now - self._checked_at >= 1.0:
            self._checked_at = now
            self.latest = datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=self.max_future)
            self.latest_text = self.latest.isoformat()[:19]

    def describe(self) -> str:
        return f"1900-01-01 to now + {self.max_future:g} s (CDP_MAX_FUTURE)"


@dataclass(frozen=True)
class Ranges:
    max_future: float = 86400.0   # seconds after now an event time may be (clock skew)
    max_amount: float = 1e9       # largest amount or unit price accepted


def check_id(path: str, value: Any) -> None:
    """Ids are keys people search and systems join on: not blank, no control characters."""
    if not isinstance(value, str):
        return  # the schema already said what is wrong
    if not value.strip():
        raise OutOfRange(f"{path}: is blank")
    bad = _CONTROL.search(value)
    if bad:
        raise OutOfRange(f"{path}: contains the control character {bad.group()!r}")


def _check_amount(path: str, value: Any, ranges: Ranges) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value) or not 0 <= value <= ranges.max_amount:
        raise OutOfRange(f"{path}: {value!r} is outside 0 to {ranges.max_amount:g} (CDP_MAX_AMOUNT)")


def _check_non_negative(path: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not (math.isfinite(value) and value >= 0):
        raise OutOfRange(f"{path}: {value!r} must be a finite number of at least 0")


def check_event(event: dict[str, Any], ranges: Ranges) -> None:
    """Raises OutOfRange for the first value of a schema-valid event that is outside its range."""
    data = event["data"]
    ids = (event["id"], event["source"], data["customer"]["source_id"])
    if _CONTROL.search("".join(ids)) or not (ids[0].strip() and ids[1].strip() and ids[2].strip()):
        for path, value in zip(("id", "source", "data.customer.source_id"), ids):  # which one, and why
            check_id(path, value)
    if "order_id" in data:
        check_id("data.order_id", data["order_id"])
    if "amount" in data:
        _check_amount("data.amount", data["amount"], ranges)
    if "duration_seconds" in data:
        _check_non_negative("data.duration_seconds", data["duration_seconds"])
    for number, item in enumerate(data.get("items") or ()):
        if isinstance(item, dict):
            _check_amount(f"data.items[{number}].unit_price", item.get("unit_price"), ranges)
            _check_non_negative(f"data.items[{number}].quantity", item.get("quantity"))
