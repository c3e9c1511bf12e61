"""Small builders of CloudEvents for tests: valid by default, easy to break on purpose."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import orjson

DEFAULT_FIELDS = {
    "cdp.identify": {},
    "cdp.purchase": {"order_id": "o-1", "amount": 10.0, "currency": "EUR",
                     "items": [{"sku": "sku-1", "quantity": 1, "unit_price": 10.0}], "channel": "store"},
    "cdp.call": {"direction": "inbound", "duration_seconds": 60, "outcome": "resolved"},
    "cdp.email": {"campaign": "spring", "action": "opened"},
    "cdp.social": {"platform": "instagram", "action": "like"},
    "cdp.feedback": {"kind": "nps", "score": 9, "comment": "great"},
    "cdp.consent": {"purpose": "marketing", "granted": True},
}


def event(event_id: str, unit: str, source_id: str, type: str = "cdp.identify", time: str = "2025-01-01T10:00:00Z",
          customer: dict[str, Any] | None = None, source: str | None = None, **fields: Any) -> dict[str, Any]:
    data = {"business_unit": unit, "customer": {"source_id": source_id, **(customer or {})},
            **DEFAULT_FIELDS[type], **fields}
    return {"specversion": "1.0", "id": event_id, "source": source or f"{unit}/test", "type": type,
            "time": time, "datacontenttype": "application/json", "subject": source_id, "data": data}


def jsonl(events: Iterable[dict | bytes | str]) -> bytes:
    lines = []
    for item in events:
        if isinstance(item, dict):
            lines.append(orjson.dumps(item))
        elif isinstance(item, str):
            lines.append(item.encode())
        else:
            lines.append(item)
    return b"\n".join(lines) + b"\n"


def write(path: Path, events: Iterable[dict | bytes | str]) -> Path:
    path.write_bytes(jsonl(events))
    return path
