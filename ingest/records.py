"""What ingest hands downstream: an accepted, normalised event or a rejection with its reason.

These two types are the whole interface between `ingest` and the stages after it, so the rest of the
platform never sees raw input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class Accepted:
    """A valid CloudEvent, normalised. `key` (source + id) is what makes a second delivery a no-op."""

    key: str
    event_id: str
    source: str
    type: str
    time: str  # RFC 3339, UTC, e.g. 2025-03-04T10:11:12+00:00
    business_unit: str
    source_id: str
    identifiers: dict[str, str]  # kind -> normalised value, only the usable ones: email, phone, national_id, loyalty_id
    profile: dict[str, Any]  # what the unit says about the person, normalised for display (email lower-cased, phone E.164)
    data: dict[str, Any]  # the type's own fields (amount, items, action …)
    origin: str = ""
    subject: str | None = None
    raw: bytes | None = None  # the event as sent (JSON), kept only for publishing (Ingestor.keep_raw)
    digest: str = ""  # what the event says (ingest.stage.content_digest): same key, other digest = conflict

    def as_sent(self) -> str:
        """The event as sent when it was kept (`raw`), else rebuilt from its normalised parts."""
        if self.raw is not None:
            return self.raw.decode("utf-8", errors="replace")
        event = {"specversion": "1.0", "id": self.event_id, "source": self.source, "type": self.type,
                 "time": self.time, **({"subject": self.subject} if self.subject is not None else {}),
                 "data": {"business_unit": self.business_unit,
                          "customer": {"source_id": self.source_id, **self.profile}, **self.data}}
        return orjson.dumps(event).decode()


@dataclass(slots=True)
class Rejected:
    """An input that cannot be used; it goes to the dead-letter with `reason` and the raw input."""

    reason: str
    origin: str
    kind: str = "invalid"  # oversize, encoding, json, schema, range, value, mapping, csv, conflict, error: for counting in summaries
    raw: str | None = None
    event_id: str | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
